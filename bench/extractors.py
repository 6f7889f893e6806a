"""Featurization throughput per extractor: evalfarm beside torch-fidelity 0.4.0, same images, same weights, one run.

Weights are seeded files in each network's canonical layout (`evalfarm.models.synthetic_extractors`): the
networks' shapes and cost are the real ones, their numbers are not (and none is reported). For each extractor,
after one warm-up batch of each tool:
- `evalfarm`: `featurize_extractors` over the set (decode in DataLoader workers, TF1 resize, network);
- `torch-fidelity`: its own loop, `get_featuresdict_from_dataset`, on its extractor built from the same file
  (its DINOv2 comes through `torch.hub.load`, answered here with evalfarm's network on the same weights, as in
  the parity tests: the two then run the same module, so that row measures the loops, not the networks);
- the features' largest absolute difference between the two.
Then `inception-v3-compat + dinov2-vit-s-14` in one `featurize_extractors` call (one decode) against the two
calls one after the other. Ends with one JSON line of every figure.

    python bench/extractors.py [--n 64] [--size 64] [--extractors inception-v3-compat,dinov2-vit-s-14,...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

DEFAULT = ("inception-v3-compat", "dinov2-vit-s-14", "dinov2-vit-b-14", "dinov2-vit-l-14", "clip-vit-b-32",
           "clip-vit-l-14", "vgg16")
FILES = {"dinov2-vit-s-14": "dinov2_vits14_pretrain.pth", "dinov2-vit-b-14": "dinov2_vitb14_pretrain.pth",
         "dinov2-vit-l-14": "dinov2_vitl14_pretrain.pth", "clip-vit-b-32": "ViT-B-32.pt", "clip-vit-l-14": "ViT-L-14.pt",
         "vgg16": "vgg16-397923af.pth"}
BATCH = 64


def write_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        coarse = (rng.rand(4, 4, 3) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return folder


def weights_file(name: str, folder: Path) -> Path:
    from evalfarm.models.synthetic import write_synthetic_weights
    from evalfarm.models.synthetic_extractors import write_synthetic_extractor_weights

    if name == "inception-v3-compat":
        return write_synthetic_weights(folder / "inception-seeded.pth", seed=0)
    return write_synthetic_extractor_weights(name, folder / FILES[name], seed=0)


def ours(name: str, path: Path):  # noqa: ANN201
    from evalfarm.models.featurizers import build_featurizer
    from evalfarm.models.weights import Weights, file_sha256

    return build_featurizer(name, Weights(path, file_sha256(path)), "cpu")


def theirs(name: str, path: Path, our_net):  # noqa: ANN001, ANN201
    from torch_fidelity import feature_extractor_dinov2
    from torch_fidelity.utils import create_feature_extractor

    if name.startswith("dinov2"):
        os.environ["XFORMERS_DISABLED"] = "1"
        feature_extractor_dinov2.torch.hub.load = lambda repo, model, **kw: our_net.net
        layer, weights_path = "dinov2", None
    else:
        layer = {"inception-v3-compat": "2048", "vgg16": "fc2_relu"}.get(name, "clip")
        weights_path = str(path)
    return create_feature_extractor(name, [layer], feature_extractor_weights_path=weights_path, cuda=False,
                                    verbose=False), layer


def run_ours(featurizers: list, folder: Path, n: int) -> tuple[dict, float]:
    from evalfarm.pipeline import featurize_extractors
    from evalfarm.sources import open_source

    source = open_source(str(folder))
    featurize_extractors(source, 0, min(BATCH, n), featurizers, batch_size=BATCH)  # warm-up
    t0 = time.perf_counter()
    stats = featurize_extractors(source, 0, n, featurizers, batch_size=BATCH)
    return {k: v.features for k, v in stats.items()}, time.perf_counter() - t0


def run_theirs(extractor, layer: str, folder: Path, warm: Path) -> tuple[np.ndarray, float]:  # noqa: ANN001
    from torch_fidelity.utils import get_featuresdict_from_dataset, prepare_input_from_id

    def once(where: Path) -> dict:
        dataset = prepare_input_from_id(1, input1=str(where), cuda=False, verbose=False, cache=False)
        return get_featuresdict_from_dataset(dataset, extractor, BATCH, False, False, False)

    once(warm)
    t0 = time.perf_counter()
    feats = once(folder)
    return feats[layer].numpy(), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images per set")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (PNG)")
    p.add_argument("--extractors", default=",".join(DEFAULT))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    names = [e.strip() for e in args.extractors.split(",") if e.strip()]
    figures: dict[str, float] = {}
    print(f"# featurization per extractor, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.n} PNG images {args.size}x{args.size}, batch {BATCH}; seeded weights (shapes and cost real, "
          "values not)")
    print(f"{'extractor':<22} {'evalfarm img/s':>15} {'torch-fidelity img/s':>21} {'ratio':>6} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_images(root / "set", args.n, args.size)
        warm = write_images(root / "warm", 8, args.size)
        built = {}
        for name in names:
            path = weights_file(name, root)
            built[name] = ours(name, path)
            with contextlib.redirect_stderr(io.StringIO()):
                their_net, layer = theirs(name, path, built[name])
            feats, t_ours = run_ours([built[name]], folder, args.n)
            ref, t_theirs = run_theirs(their_net, layer, folder, warm)
            diff = float(np.abs(feats[name] - ref).max())
            figures[f"{name}.evalfarm_img_s"] = args.n / t_ours
            figures[f"{name}.torch_fidelity_img_s"] = args.n / t_theirs
            figures[f"{name}.max_abs_diff"] = diff
            print(f"{name:<22} {args.n / t_ours:>15.2f} {args.n / t_theirs:>21.2f} {t_theirs / t_ours:>6.2f} "
                  f"{diff:>11.2e}", flush=True)
            del their_net
            if name not in ("inception-v3-compat", "dinov2-vit-s-14"):
                del built[name]
        pair = [n for n in ("inception-v3-compat", "dinov2-vit-s-14") if n in built]
        if len(pair) == 2:
            _, together = run_ours([built[n] for n in pair], folder, args.n)
            apart = sum(run_ours([built[n]], folder, args.n)[1] for n in pair)
            figures["pair.one_decode_s"], figures["pair.two_calls_s"] = together, apart
            print(f"{' + '.join(pair)}: one call (one decode) {together:.2f} s, two calls {apart:.2f} s")
    print(json.dumps({k: round(v, 6) if abs(v) >= 1e-3 else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
