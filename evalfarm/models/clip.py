"""The visual tower of OpenAI's CLIP ViTs, as torch-fidelity 0.4.0 ports and loads it, and a safe reader of
OpenAI's TorchScript checkpoint files.

torch-fidelity loads the OpenAI JIT file (`ViT-B-32.pt`, ...), takes its `state_dict()`, keeps the `visual.*`
keys and runs its own port of `VisionTransformer` (`visual(x)`: the final-LayerNorm CLS token projected by
`visual.proj`). Before loading, it casts the model's convolution, linear and attention weights to fp16 and
back to fp32 afterwards (OpenAI's `convert_weights`): the effective weights are fp16-rounded even where a
file stores fp32. We apply exactly that rounding, to exactly those tensors.

Module names are OpenAI's key names. Attention is `nn.MultiheadAttention` in the sequence-first layout,
called as torch-fidelity calls it, so both run the same kernels.

A TorchScript archive is code plus pickled objects; `torch.jit.load` compiles that code and may run it on
load (`__setstate__`), and `torch.load(weights_only=True)` refuses such archives. We never load it as a
program: `read_torchscript_tensors` unpickles `data.pkl` with an allow-list (tensor rebuild, storages,
OrderedDict, TorchScript list tags) and turns every `__torch__.*` object into an inert attribute bag, so no
code from the file runs. Plain state-dict files (`torch.save(state_dict)`) load with `weights_only=True`.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evalfarm.errors import WeightsError

HEAD_WIDTH = 64  #: OpenAI's ViTs have width // 64 heads
#: The tensors torch-fidelity's `convert_weights` casts to fp16 before loading (Conv2d/Linear weights and
#: biases, MultiheadAttention's packed input projection); `proj`, embeddings and LayerNorms stay fp32.
HALF_ROUNDED = re.compile(r"(conv1\.weight|attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias))$")  # fmt: skip


@dataclass(frozen=True)
class ClipViTArch:
    width: int
    layers: int
    patch_size: int
    resolution: int
    embed_dim: int

    @property
    def heads(self) -> int:
        return self.width // HEAD_WIDTH


#: OpenAI's CLIP ViTs by file stem (torch-fidelity reads these off the weights; we check them against the name)
ARCHS = {
    "ViT-B-32": ClipViTArch(768, 12, 32, 224, 512),
    "ViT-B-16": ClipViTArch(768, 12, 16, 224, 512),
    "ViT-L-14": ClipViTArch(1024, 24, 14, 224, 768),
    "ViT-L-14-336px": ClipViTArch(1024, 24, 14, 336, 768),
}


def arch_from_state_dict(state: dict[str, torch.Tensor]) -> ClipViTArch:
    """Read the architecture off the weights, as torch-fidelity's `build_model` does."""
    if "visual.proj" not in state:
        raise WeightsError("not a CLIP ViT checkpoint: it has no 'visual.proj' (ResNet CLIPs are not supported)")
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = sum(1 for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
    return ClipViTArch(width, layers, patch, patch * grid, state["visual.proj"].shape[1])


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP-normalized NCHW images at `arch.resolution` → the projected CLS embedding [N, embed_dim]."""

    def __init__(self, arch: ClipViTArch) -> None:
        super().__init__()
        w = arch.width
        grid = arch.resolution // arch.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=arch.patch_size, stride=arch.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, arch.layers, arch.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, arch.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)  # sequence-first, as nn.MultiheadAttention is called in CLIP
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIPVisual(nn.Module):
    """Holds the tower as `.visual`, so that the module's keys are the checkpoint's `visual.*` keys."""

    def __init__(self, arch: ClipViTArch) -> None:
        super().__init__()
        self.arch = arch
        self.visual = VisionTransformer(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors in float32, rounded through fp16 exactly where torch-fidelity rounds them."""
    out = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            continue
        out[key] = value.to(torch.float16).float() if HALF_ROUNDED.search(key) else value.float()
    return out


# -- reading OpenAI's TorchScript files without running them ---------------------------------------------------

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptObject:
    """A TorchScript object (module) from the archive, reduced to its pickled attributes; none of its code runs."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "restore_type_tag"): _identity,
        ("torch.jit._pickle", "build_intlist"): _identity,
        ("torch.jit._pickle", "build_doublelist"): _identity,
        ("torch.jit._pickle", "build_boollist"): _identity,
        ("torch.jit._pickle", "build_tensorlist"): _identity,
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise WeightsError(
            f"{self.path}: refusing to unpickle {module}.{name} (not a tensor or a module's state). If you trust "
            f"the file, convert it where it may run: torch.save(torch.jit.load(path).state_dict(), 'clip.pth'), "
            f"and pass the .pth instead."
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            if flat.numel() != numel:
                raise WeightsError(f"{self.path}: storage {key} holds {flat.numel()} elements, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name (a superset of its
    `state_dict()`: parameters, buffers and any plain tensor attributes), without loading it as a program."""
    with zipfile.ZipFile(path) as z:
        records = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(records) != 1:
            raise WeightsError(f"{path} is not a TorchScript archive (no single data.pkl record)")
        prefix = records[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in z.namelist() and z.read(f"{prefix}byteorder").strip() != b"little":
            raise WeightsError(f"{path} stores big-endian tensors, which evalfarm does not read")
        root = _RestrictedUnpickler(z.read(records[0]), z, prefix, path).load()
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            return
        for key, value in state.items():
            full = f"{name}{key}"
            if isinstance(value, torch.Tensor):
                tensors[full] = value
            elif isinstance(value, ScriptObject):
                walk(value, full + ".")

    walk(root, "")
    if not tensors:
        raise WeightsError(f"{path} holds no tensors")
    return tensors
