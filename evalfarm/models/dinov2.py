"""DINOv2 ViT-S/B/L/g 14 as torch.hub's `facebookresearch/dinov2` builds them, under the hub's key names.

torch-fidelity 0.4.0 takes these networks from torch.hub (`dinov2_vit{s,b,l,g}14`, no registers) and uses
their forward: the final-LayerNorm CLS token. The module names here are the hub checkpoint's keys
(`dinov2_vits14_pretrain.pth`, ...), so that file loads strictly, and every operation is the hub code's at
its current main (attention by `scaled_dot_product_attention`, exact GELU, LayerNorm eps 1e-6, LayerScale,
SwiGLU for ViT-g). The checkpoints store a 37x37 position grid (518 px); a 224 px input needs 16x16, which
the hub resamples with a historical kludge — bicubic at scale factor (16 + 0.1) / 37, no antialias — that
timm does not reproduce (it resizes to a size, with antialias), hence this port rather than timm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH_SIZE = 14
CHECKPOINT_IMG_SIZE = 518  #: the hub builds every backbone at 518 px: 37x37 patches, a 1370-token pos_embed
INTERPOLATE_OFFSET = 0.1  #: the hub's default for the models without registers
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DinoV2Arch:
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" (GELU MLP, 4x) or "swiglu" (SwiGLUFFNFused)


ARCHS = {
    "vits14": DinoV2Arch(384, 12, 6, "mlp"),
    "vitb14": DinoV2Arch(768, 12, 12, "mlp"),
    "vitl14": DinoV2Arch(1024, 24, 16, "mlp"),
    "vitg14": DinoV2Arch(1536, 40, 24, "swiglu"),
}


def swiglu_hidden(dim: int) -> int:
    """SwiGLUFFNFused's hidden width for a 4x MLP: 2/3 of it, rounded up to a multiple of 8 (4096 at 1536)."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).contiguous().view(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, arch: DinoV2Arch) -> None:
        super().__init__()
        d = arch.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.attn = Attention(d, arch.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLUFFN(d) if arch.ffn == "swiglu" else Mlp(d)
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The hub's `interpolate_pos_encoding` for a square `grid` x `grid` patch input (float32)."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if grid == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    pos_embed = pos_embed.float()
    scale = float(grid + INTERPOLATE_OFFSET) / m
    patch = F.interpolate(
        pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"position grid {m} cannot be resampled to {grid}")
    patch = patch.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((pos_embed[:, 0].unsqueeze(0), patch), dim=1)


class DinoVisionTransformer(nn.Module):
    """Maps ImageNet-normalized NCHW images (sides a multiple of 14) to the normalized CLS token [N, D]."""

    def __init__(self, arch: DinoV2Arch) -> None:
        super().__init__()
        d = arch.embed_dim
        grid = CHECKPOINT_IMG_SIZE // PATCH_SIZE
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # masked training only; kept for strict loading
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if h != w or h % PATCH_SIZE:
            raise ValueError(f"DINOv2 input must be square with sides a multiple of {PATCH_SIZE}, got {h}x{w}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, h // PATCH_SIZE).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]
