"""One farm run of the scale section with the code of a given checkout: an A/B of two commits on one machine.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/scale_ab.py /tmp/before 1m.s5000.w1.before 1
    .venv/bin/python bench/scale_ab.py . 1m.s5000.w1.after 1

Runs `scale.farm_run` (1M samples against a 50k reference, shards of 5000, K workers) with that checkout's
`bench/` and `evalfarm` first on the path, so its workers run its code; the sets are written once to
/tmp/ab-data by `scale.write_npz` with the section's seeds. Needs the services `bench/scale.py` needs.
"""

import sys
from pathlib import Path

tree = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(tree / "bench"), str(tree)]

import scale  # noqa: E402
import sqlalchemy  # noqa: E402
from common import Report  # noqa: E402
from farm import DATABASE_URL  # noqa: E402

data = Path("/tmp/ab-data")
data.mkdir(exist_ok=True)
ref = scale.write_npz(data / "ref-50000.npz", 50_000, seed=2)
samples = scale.write_npz(data / "samples-1000000.npz", 1_000_000, seed=1)
engine = sqlalchemy.create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
label = sys.argv[2]
scale.farm_run(Report(), Path(f"/tmp/ab-root-{label}"), samples, ref, int(sys.argv[3]), 5000, label, engine)
