"""The feature extractors of torch-fidelity 0.4.0 beyond Inception: one table, their weights, one way to run them.

`EXTRACTORS` maps each `--extractor` name (torch-fidelity's own names) to what defines its features: the
feature width, the network's input size and normalization, the layer torch-fidelity uses for FID/KID (and
IS/PRC: it is the same layer for every metric in these extractors), and the canonical weight file with its
URL and the hash its publisher gives. Every input goes through what torch-fidelity does: uint8 → float32 →
TF1-compatible bilinear resize to the input size → `(x - 255·mean) / (255·std)` → network.

Weights: a path given, else `EVALFARM_WEIGHTS_<NAME>`, else the file in the weights cache (or torch.hub's
checkpoint folder, where torch-fidelity caches the same files), else a download verified against the hash
where one is published. Every file is loaded without unpickling code and strictly: a wrong file is a
`WeightsError` that says what was expected. The full SHA-256 of the file used is kept for the record.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import nn

from evalfarm.errors import WeightsError
from evalfarm.models import clip, dinov2, vgg16
from evalfarm.models.extractor import resolve_device
from evalfarm.models.resize import resize_tf_bilinear
from evalfarm.models.weights import Weights, download_verified, file_sha256, load_state_dict
from evalfarm.settings import Settings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
CLIP_BASE_URL = "https://openaipublic.azureedge.net/clip/models"  #: torch-fidelity's and OpenAI's `clip.py`'s
ENV_PREFIX = "EVALFARM_WEIGHTS_"


@dataclass(frozen=True)
class ExtractorSpec:
    """What defines an extractor's features; two runs agree only if all of this and the weights agree."""

    name: str
    family: str  #: "dinov2", "clip" or "vgg16"
    arch: str  #: the family's architecture key (dinov2.ARCHS, the CLIP file stem, "vgg16")
    dim: int
    input_size: int
    mean: tuple[float, float, float]  #: of [0, 1] images; applied to [0, 255] as 255·mean, like torch-fidelity
    std: tuple[float, float, float]
    layers: tuple[str, ...]  #: torch-fidelity's feature names; the first is its default for FID/KID/IS/PRC
    weights_file: str  #: the canonical file name (torch.hub's cache name, as torch-fidelity stores it)
    urls: tuple[str, ...]
    sha256: str | None  #: full SHA-256, or torch.hub's name prefix; None where the publisher gives none
    notes: str = field(default="", compare=False)

    @property
    def layer(self) -> str:
        return self.layers[0]

    @property
    def env_var(self) -> str:
        """`EVALFARM_WEIGHTS_DINOV2_VIT_L_14` for `dinov2-vit-l-14`: a local weight file for this extractor."""
        return ENV_PREFIX + self.name.upper().replace("-", "_")


def _dinov2(size: str, dim: int) -> ExtractorSpec:
    stem = f"dinov2_vit{size}14"
    return ExtractorSpec(
        name=f"dinov2-vit-{size}-14",
        family="dinov2",
        arch=f"vit{size}14",
        dim=dim,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        layers=("dinov2",),
        weights_file=f"{stem}_pretrain.pth",
        urls=(f"{DINOV2_BASE_URL}/{stem}/{stem}_pretrain.pth",),
        sha256=None,
        notes="torch.hub facebookresearch/dinov2; Meta publishes no checksum and torch.hub checks none",
    )


def _clip(name: str, stem: str, digest: str, dim: int, size: int) -> ExtractorSpec:
    return ExtractorSpec(
        name=name,
        family="clip",
        arch=stem,
        dim=dim,
        input_size=size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        layers=("clip",),
        weights_file=f"{name}-{digest}.pt",
        urls=(f"{CLIP_BASE_URL}/{digest}/{stem}.pt",),
        sha256=digest,
        notes="OpenAI TorchScript file; the URL path is its SHA-256 (checked by clip.py and by torch-fidelity)",
    )


EXTRACTORS: dict[str, ExtractorSpec] = {
    spec.name: spec
    for spec in (
        _dinov2("s", 384),
        _dinov2("b", 768),
        _dinov2("l", 1024),
        _dinov2("g", 1536),
        _clip(
            "clip-vit-b-32", "ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", 512, 224
        ),
        _clip(
            "clip-vit-b-16", "ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", 512, 224
        ),
        _clip(
            "clip-vit-l-14", "ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", 768, 224
        ),
        _clip(
            "clip-vit-l-14-336px",
            "ViT-L-14-336px",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            768,
            336,
        ),
        ExtractorSpec(
            name="vgg16",
            family="vgg16",
            arch="vgg16",
            dim=vgg16.FC2_DIM,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            layers=vgg16.LAYERS,
            weights_file="vgg16-397923af.pth",
            urls=("https://download.pytorch.org/models/vgg16-397923af.pth",),
            sha256="397923af",
            notes="torchvision VGG16_Weights.IMAGENET1K_V1; the name carries the SHA-256 prefix (torch.hub check_hash)",
        ),
    )
}


def get_spec(name: str) -> ExtractorSpec:
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}") from None


# -- weights -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractorWeights(Weights):
    """A weight file for one extractor, with the hash its publisher gives (if any)."""

    expected_sha256: str | None = None

    @property
    def canonical(self) -> bool | None:  # type: ignore[override]
        """True for the published file, False for another one, None where no hash is published (DINOv2)."""
        if self.expected_sha256 is None:
            return None
        return self.sha256.startswith(self.expected_sha256)


def _help(spec: ExtractorSpec) -> str:
    return (
        f"Download {spec.weights_file} from {spec.urls[0]} on a machine with internet access, copy it here, and "
        f"pass its path or set {spec.env_var}=PATH."
    )


def _verified(spec: ExtractorSpec, path: Path) -> ExtractorWeights:
    return ExtractorWeights(path, file_sha256(path), spec.sha256)


def resolve_extractor_weights(
    name: str, path: str | os.PathLike | None, cache_dir: Path, *, allow_download: bool = True
) -> ExtractorWeights:
    """The weights at `path`, else the cached canonical file (ours, then torch.hub's), else a verified download."""
    spec = get_spec(name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(f"{name} weights not found at {p}. " + _help(spec))
        return _verified(spec, p)
    for cached in (cache_dir / spec.weights_file, Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file):
        if cached.is_file():
            weights = _verified(spec, cached)
            if weights.canonical is False:
                raise WeightsError(
                    f"{cached} has SHA-256 {weights.sha256}, not the published {spec.sha256}: a corrupt or "
                    f"different file under the canonical name. Delete it, or pass it explicitly to use it anyway."
                )
            return weights
    if not allow_download:
        raise WeightsError(f"{name} weights are not cached and downloading is disabled. " + _help(spec))
    return download_extractor_weights(spec, cache_dir / spec.weights_file)


def load_extractor_weights(settings: Settings, name: str, path: str | os.PathLike | None = None) -> ExtractorWeights:
    """The weights this machine is configured with: `path`, else `EVALFARM_WEIGHTS_<NAME>`, else the canonical file."""
    spec = get_spec(name)
    path = path or os.environ.get(spec.env_var) or None
    return resolve_extractor_weights(name, path, settings.weights_cache, allow_download=settings.allow_download)


def download_extractor_weights(spec: ExtractorSpec, dest: Path) -> ExtractorWeights:
    """Download to a temporary file, check the published hash, then move into place atomically."""
    sha = download_verified(dest, spec.urls, spec.sha256, what=f"the {spec.name} weights", help_text=_help(spec))
    return ExtractorWeights(dest, sha, spec.sha256)


# -- networks -------------------------------------------------------------------------------------------------------


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str, weights: Weights) -> nn.Module:
    """Strict `load_state_dict` into a meta-device module, each failure a WeightsError naming the file."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or misshapen:
        raise WeightsError(
            f"{weights.path} is not a {what} weight file (missing keys: {missing[:5]}, unexpected keys: "
            f"{unexpected[:5]}, wrong shapes: {misshapen[:5]})."
        )
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def _read_state(weights: Weights) -> dict[str, torch.Tensor]:
    state = load_state_dict(weights)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{weights.path} is not a flat state dict of tensors.")
    return state


def _build_dinov2(spec: ExtractorSpec, weights: Weights, layer: str) -> nn.Module:
    with torch.device("meta"):
        net = dinov2.DinoVisionTransformer(dinov2.ARCHS[spec.arch])
    return _load_strict(net, _read_state(weights), f"{spec.name} (torch.hub {spec.weights_file} layout)", weights)


def _build_clip(spec: ExtractorSpec, weights: Weights, layer: str) -> nn.Module:
    try:
        if clip.is_torchscript_archive(weights.path):
            state = clip.read_torchscript_tensors(weights.path)
        else:
            state = _read_state(weights)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{weights.path} is not a readable CLIP checkpoint: {exc}") from exc
    try:
        arch = clip.arch_from_state_dict(state)
    except KeyError as exc:
        raise WeightsError(f"{weights.path} is not a CLIP ViT checkpoint (no {exc})") from exc
    if arch != clip.ARCHS[spec.arch]:
        raise WeightsError(f"{weights.path} holds a CLIP {arch}; {spec.name} is {clip.ARCHS[spec.arch]}.")
    with torch.device("meta"):
        net = clip.CLIPVisual(arch)
    return _load_strict(net, clip.visual_state(state), f"{spec.name} (OpenAI CLIP layout)", weights)


def _build_vgg16(spec: ExtractorSpec, weights: Weights, layer: str) -> nn.Module:
    state = _read_state(weights)
    try:
        return vgg16.vgg16_from_state_dict(state, layer).eval().requires_grad_(False)
    except RuntimeError as exc:
        raise WeightsError(f"{weights.path} is not a torchvision vgg16 state dict: {exc}") from exc


_BUILDERS: dict[str, Callable[[ExtractorSpec, Weights, str], nn.Module]] = {
    "dinov2": _build_dinov2,
    "clip": _build_clip,
    "vgg16": _build_vgg16,
}


def preprocess(batch: torch.Tensor, spec: ExtractorSpec) -> torch.Tensor:
    """torch-fidelity's input path: float32 → TF1 bilinear resize to the input size → (x − 255·mean) / (255·std)."""
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected an NCHW batch of RGB images, got shape {tuple(batch.shape)}")
    x = resize_tf_bilinear(batch.float(), spec.input_size)
    # The constants are computed with the same Python float arithmetic as in torch-fidelity's files.
    return TF.normalize(x, [255 * m for m in spec.mean], [255 * s for s in spec.std], inplace=False)


class ImageFeatureExtractor:
    """One extractor on one device: call it with NCHW image batches, uint8 of any size (or float in [0, 255]);
    it returns float32 features [N, dim] of torch-fidelity's default layer (or the `layer` built) as a CPU array."""

    def __init__(self, spec: ExtractorSpec, weights: Weights, net: nn.Module, device: torch.device) -> None:
        self.spec, self.weights, self.device = spec, weights, device
        self.net = net.to(device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = preprocess(batch.to(self.device, non_blocking=True), self.spec)
        return self.net(x).float().cpu().numpy()


def build(
    name: str,
    weights: Weights | str | os.PathLike,
    device: str = "auto",
    *,
    layer: str | None = None,
) -> ImageFeatureExtractor:
    """The extractor `name` with the given weight file (a path, or verified `Weights`), on `device`.

    `layer` picks another of torch-fidelity's layers where it offers one (`vgg16`: `fc2`); the default is
    torch-fidelity's default layer. TF32 is switched off on CUDA, as for Inception: it moves features.
    """
    spec = get_spec(name)
    layer = layer or spec.layer
    if layer not in spec.layers:
        raise ValueError(f"{name} provides the layers {spec.layers}, not {layer!r}")
    if not isinstance(weights, Weights):
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"{name} weights not found at {p}. " + _help(spec))
        weights = _verified(spec, p)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    net = _BUILDERS[spec.family](spec, weights, layer)
    return ImageFeatureExtractor(spec, weights, net, dev)
