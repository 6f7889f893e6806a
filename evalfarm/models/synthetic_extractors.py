"""Seeded stand-in weights for the DINOv2, CLIP and VGG16 extractors, in each canonical file layout.

For tests and benchmarks where the real files are absent (no network). Each file has the real checkpoint's
key names, shapes and layout — a torch.hub DINOv2 `*_pretrain.pth` state dict, an OpenAI CLIP TorchScript
archive (or the same tensors as a plain state dict), a torchvision `vgg16` state dict — and values drawn
from a seed and scaled so activations stay O(1) through every layer (the transformers by fan-in scaling
and LayerNorm, VGG16 by calibrating each layer on seeded images). Features computed with these weights
exercise the arithmetic only: they are NOT DINOv2/CLIP/VGG16 features and no metric from them means anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evalfarm.models import clip, dinov2
from evalfarm.models.extractors import IMAGENET_MEAN, IMAGENET_STD, get_spec

#: OpenAI's CLIP text towers (width, heads, layers), by file stem
CLIP_TEXT = {
    "ViT-B-32": (512, 8, 12),
    "ViT-B-16": (512, 8, 12),
    "ViT-L-14": (768, 12, 12),
    "ViT-L-14-336px": (768, 12, 12),
}
CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def _writer(save: Callable[[str], None], path: str | os.PathLike) -> Path:
    """Write through a temporary file and `os.replace` (concurrent test workers may race on one path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-weights-", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _smooth_grid(g: torch.Generator, grid: int, dim: int, amplitude: float) -> torch.Tensor:
    """A [grid*grid, dim] table of low-frequency patterns, so resampling it is a meaningful operation."""
    coarse = torch.randn(1, dim, 5, 5, generator=g) * amplitude
    return F.interpolate(coarse, size=(grid, grid), mode="bicubic", align_corners=True)[0].flatten(1).T.contiguous()


# -- DINOv2 --------------------------------------------------------------------------------------------------------


def _dinov2_value(key: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if key == "pos_embed":
        grid = round(math.sqrt(shape[1] - 1))
        return torch.cat([torch.randn(1, shape[2], generator=g), _smooth_grid(g, grid, shape[2], 0.5)])[None]
    if key in ("cls_token", "mask_token"):
        return torch.randn(shape, generator=g) * 0.5
    if key.endswith(".gamma"):
        return torch.rand(shape, generator=g) * 0.4 + 0.1  # LayerScale
    if ("norm" in key) and key.endswith(".weight"):
        return 1 + torch.randn(shape, generator=g) * 0.1
    if key.endswith(".bias"):
        return torch.randn(shape, generator=g) * 0.05
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def make_dinov2_state(name: str, seed: int = 0, *, depth: int | None = None) -> dict[str, torch.Tensor]:
    """A torch.hub DINOv2 checkpoint's state dict (`name` as in the registry); `depth` truncates it for tests."""
    arch = dinov2.ARCHS[get_spec(name).arch]
    if depth is not None:
        arch = dinov2.DinoV2Arch(arch.embed_dim, depth, arch.num_heads, arch.ffn)
    with torch.device("meta"):
        layout = dinov2.DinoVisionTransformer(arch).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {key: _dinov2_value(key, t.shape, g) for key, t in layout.items()}


# -- CLIP ----------------------------------------------------------------------------------------------------------


class _OpenAIClipLayout(nn.Module):
    """The module tree of OpenAI's JIT CLIP files (vision and text towers, the three int buffers); its
    forward exists only so that TorchScript can compile the archive."""

    def __init__(self, arch: clip.ClipViTArch, text: tuple[int, int, int], text_tower: bool) -> None:
        super().__init__()
        width, heads, layers = text
        self.visual = clip.VisionTransformer(arch)
        if text_tower:
            self.transformer = clip.Transformer(width, layers, heads)
            self.token_embedding = nn.Embedding(CLIP_VOCAB_SIZE, width)
            self.positional_embedding = nn.Parameter(torch.zeros(CLIP_CONTEXT_LENGTH, width))
            self.ln_final = nn.LayerNorm(width)
            self.logit_scale = nn.Parameter(torch.zeros(()))
        self.text_projection = nn.Parameter(torch.zeros(width, arch.embed_dim))
        self.register_buffer("input_resolution", torch.tensor(arch.resolution))
        self.register_buffer("context_length", torch.tensor(CLIP_CONTEXT_LENGTH))
        self.register_buffer("vocab_size", torch.tensor(CLIP_VOCAB_SIZE))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def _clip_value(key: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    if key == "visual.positional_embedding":
        grid = round(math.sqrt(shape[0] - 1))
        return torch.cat([torch.randn(1, shape[1], generator=g) * 0.5, _smooth_grid(g, grid, shape[1], 0.5)])
    if key in ("visual.class_embedding", "positional_embedding", "token_embedding.weight"):
        return torch.randn(shape, generator=g) * 0.5
    if key == "logit_scale":
        return torch.tensor(math.log(100.0))
    if ".ln_" in key or key.startswith("ln_final"):
        if key.endswith("weight"):
            return 1 + torch.randn(shape, generator=g) * 0.1
        return torch.randn(shape, generator=g) * 0.05
    if key.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.05
    if key in ("visual.proj", "text_projection"):
        return torch.randn(shape, generator=g) / math.sqrt(shape[0])
    return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))


def make_clip_state(
    name: str, seed: int = 0, *, text_tower: bool = True, layers: int | None = None
) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP checkpoint's state dict, with OpenAI's key names and dtypes (convolution, linear and
    attention weights and both projections in fp16, as OpenAI's `convert_weights` leaves them; the rest fp32).
    Without `text_tower`, only `text_projection` of the text side is kept (all that the visual tower reads);
    `layers` truncates the vision tower for tests (such a file is no longer `name`'s layout)."""
    stem = get_spec(name).arch
    arch = clip.ARCHS[stem]
    if layers is not None:
        arch = dataclasses.replace(arch, layers=layers)
    with torch.device("meta"):
        layout = _OpenAIClipLayout(arch, CLIP_TEXT[stem], text_tower).state_dict()
    g = torch.Generator().manual_seed(seed)
    ints = {"input_resolution": arch.resolution, "context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE}
    state = {}
    for key, t in layout.items():
        if key in ints:
            state[key] = torch.tensor(ints[key])
            continue
        value = _clip_value(key, t.shape, g)
        half = clip.HALF_ROUNDED.search(key) or key in ("visual.proj", "text_projection")
        state[key] = value.half() if half else value
    return state


def write_clip_torchscript(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """Save `state` as a TorchScript archive like OpenAI's files (what `torch.jit.load` and torch-fidelity read)."""
    text_tower = "ln_final.weight" in state
    width = state["text_projection"].shape[0]
    text_layers = sum(1 for k in state if k.startswith("transformer.") and k.endswith(".attn.in_proj_weight"))
    with torch.device("meta"):
        module = _OpenAIClipLayout(
            clip.arch_from_state_dict(state), (width, width // clip.HEAD_WIDTH, text_layers), text_tower
        )
    module.load_state_dict(state, strict=True, assign=True)
    scripted = torch.jit.script(module)
    return _writer(lambda tmp: torch.jit.save(scripted, tmp), path)


# -- VGG16 ---------------------------------------------------------------------------------------------------------


def calibration_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth seeded colour fields in [0, 255], NCHW float."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 255
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255)


@torch.no_grad()
def make_vgg16_state(seed: int = 0, n_calibration: int = 2) -> dict[str, torch.Tensor]:
    """A torchvision `vgg16` state dict whose every layer outputs unit-variance pre-activations on seeded images."""
    import torchvision

    with torch.random.fork_rng():  # seeded without disturbing the caller's global RNG
        torch.manual_seed(seed)
        net = torchvision.models.vgg16(weights=None).eval()
        for layer in net.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.bias.uniform_(-0.1, 0.1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = (calibration_images(n_calibration, 224, seed) - mean) / std
    layers = [*net.features, net.avgpool, nn.Flatten(), *net.classifier]
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            spread = layer(x).std()
            layer.weight.div_(spread)
            layer.bias.div_(spread)
        x = layer(x)
    return net.state_dict()


# -- files -----------------------------------------------------------------------------------------------------------


def write_synthetic_extractor_weights(name: str, path: str | os.PathLike, seed: int = 0, **options: object) -> Path:
    """Write seeded weights for extractor `name` in its canonical file format (CLIP: TorchScript unless
    `torchscript=False`; `text_tower=False` keeps CLIP files small)."""
    family = get_spec(name).family
    if family == "dinov2":
        state = make_dinov2_state(name, seed, **options)  # type: ignore[arg-type]
        return _writer(lambda tmp: torch.save(state, tmp), path)
    if family == "clip":
        torchscript = bool(options.pop("torchscript", True))
        state = make_clip_state(name, seed, **options)  # type: ignore[arg-type]
        if torchscript:
            return write_clip_torchscript(path, state)
        return _writer(lambda tmp: torch.save(state, tmp), path)
    state = make_vgg16_state(seed)
    return _writer(lambda tmp: torch.save(state, tmp), path)
