"""Shared fixtures: seeded Inception weights, small seeded image sets, an isolated evalfarm home per test.

The weights are random but BatchNorm-calibrated (see `evalfarm.models.synthetic`): numbers computed with
them test the arithmetic against torch-fidelity, and are not FID values of anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from evalfarm.models.synthetic import write_synthetic_weights
from evalfarm.models.synthetic_extractors import write_synthetic_extractor_weights

from .helpers import KID_SUBSET, N_REFERENCE, N_SAMPLES, evaluate_in_home, use_home, write_images


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def weights_path(data_root: Path) -> Path:
    return write_synthetic_weights(data_root / "synthetic-inception.pth", seed=0)


@pytest.fixture(scope="session")
def other_weights_path(data_root: Path) -> Path:
    return write_synthetic_weights(data_root / "synthetic-inception-other.pth", seed=1)


#: seeded weight files of the other extractors, under their canonical file names (torch.hub's cache names)
EXTRACTOR_FILES = {"dinov2-vit-s-14": "dinov2_vits14_pretrain.pth", "clip-vit-b-32": "ViT-B-32.pt",
                   "vgg16": "vgg16-397923af.pth"}


@pytest.fixture(scope="session")
def extractor_weights(data_root: Path) -> Callable[[str], Path]:
    """`extractor_weights(name)`: that extractor's seeded weight file, written on first use (VGG16's is 528 MB)."""
    folder = data_root / "extractor-weights"
    folder.mkdir(exist_ok=True)
    written: dict[str, Path] = {}

    def path(name: str) -> Path:
        if name not in written:
            written[name] = write_synthetic_extractor_weights(name, folder / EXTRACTOR_FILES[name], seed=0)
        return written[name]

    return path


@pytest.fixture(scope="session")
def samples_dir(data_root: Path) -> Path:
    return write_images(data_root / "samples", N_SAMPLES, 32, seed=1, brightness=1.0)


@pytest.fixture(scope="session")
def reference_dir(data_root: Path) -> Path:
    # A different size on purpose: the reference goes through the resize from another input size.
    return write_images(data_root / "reference", N_REFERENCE, 40, seed=2, brightness=0.7)


@pytest.fixture(autouse=True)
def evalfarm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own database, feature store and weights cache; no network downloads."""
    home = tmp_path / "evalfarm-home"
    use_home(monkeypatch, home)
    return home


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault report: what each injected fault did to its jobs, and how long recovery took."""
    from .servers import REPORT

    if not REPORT:
        return
    terminalreporter.section("fault report (private Redis and Postgres, real workers)")
    terminalreporter.write_line(f"{'fault':<50} {'jobs ok':>8} {'identical':>10} {'recovery s':>11}")
    for row in REPORT:
        same = {True: "yes", False: "NO", None: "-"}[row["identical"]]
        recovery = "-" if row["recovery_s"] is None else f"{row['recovery_s']:.1f}"
        terminalreporter.write_line(
            f"{row['fault']:<50} {row['completed']:>4}/{row['total']:<3} {same:>10} {recovery:>11}"
        )


def pytest_configure(config: pytest.Config) -> None:
    # Two cores here: one for the network, one for decoding. Keep torch from oversubscribing.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))


# -- session-scoped evaluations, shared by test_parity.py and test_embedded.py ------------------------------------


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One evalfarm home for the session fixtures; its feature store caches the reference of the parity run."""
    return tmp_path_factory.mktemp("shared-evalfarm-home")


@pytest.fixture(scope="session")
def parity_result(shared_home: Path, samples_dir: Path, reference_dir: Path, weights_path: Path) -> dict:
    """evalfarm on samples_dir vs reference_dir, shard size 16 (70 images featurized, once per session)."""
    return evaluate_in_home(
        shared_home,
        str(samples_dir),
        str(reference_dir),
        weights=str(weights_path),
        kid_subset_size=KID_SUBSET,
        kid_subsets=10,
        shard_size=16,
    )
