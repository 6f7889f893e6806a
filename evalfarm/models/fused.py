"""An inference-only rewrite of FID-InceptionV3 that computes the same function with less work on CPU.

Three exact algebraic rewrites (they change only float32 rounding):
- BatchNorm folded into its convolution (w·γ/σ, β − μ·γ/σ), so each layer is one conv plus a ReLU;
- the 1×1 convolutions of a block that read the same input run as one wider convolution (one pass over
  the input, one larger GEMM);
- a pool branch's average pool and its 1×1 convolution swap places: both are linear, and a padding-excluding
  average of a constant bias is that bias, so the pool runs over 32–192 output channels instead of 192–2048
  input ones, and that convolution joins the block's wide 1×1 convolution.
Built from a loaded `FIDInceptionV3`, so the canonical weight file remains the only input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evalfarm.models.inception import (
    BasicConv2d,
    FIDInceptionV3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
    _tf_avg_pool,
)


def fold(layer: BasicConv2d) -> nn.Conv2d:
    """The convolution with its BatchNorm folded in, computed in float64 and stored in the layer's dtype."""
    conv, bn = layer.conv, layer.bn
    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=True,
        dtype=dtype,
    )
    with torch.no_grad():
        out.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(dtype))
        out.bias.copy_((bn.bias.double() - bn.running_mean.double() * scale).to(dtype))
    return out.eval().requires_grad_(False)


def fold_wide(layers: list[BasicConv2d]) -> tuple[nn.Conv2d, list[int]]:
    """One convolution computing the given 1×1 layers side by side, and its output widths."""
    parts = [fold(x) for x in layers]
    wide = nn.Conv2d(
        parts[0].in_channels, sum(p.out_channels for p in parts), 1, bias=True, dtype=parts[0].weight.dtype
    )
    with torch.no_grad():
        wide.weight.copy_(torch.cat([p.weight for p in parts]))
        wide.bias.copy_(torch.cat([p.bias for p in parts]))
    return wide.eval().requires_grad_(False), [p.out_channels for p in parts]


class Chain(nn.Module):
    """Folded conv → ReLU, repeated."""

    def __init__(self, layers: list[BasicConv2d]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(fold(x) for x in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return x


class FusedPoolBlock(nn.Module):
    """Mixed_5x (InceptionA) and Mixed_6b–e (InceptionC): a 1×1 branch, two conv chains, an average-pool branch.

    The four branches' first 1×1 convolutions run as one wide convolution; the chains continue from it.
    """

    def __init__(self, heads: list[BasicConv2d], chain1: list[BasicConv2d], chain2: list[BasicConv2d]) -> None:
        super().__init__()
        self.head, self.widths = fold_wide(heads)
        self.chain1, self.chain2 = Chain(chain1), Chain(chain2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, hc, hd, hp = self.head(x).split(self.widths, dim=1)
        return torch.cat(
            [F.relu(h1), self.chain1(F.relu(hc)), self.chain2(F.relu(hd)), F.relu(_tf_avg_pool(hp), inplace=True)], 1
        )


def fused_a(b: InceptionA) -> FusedPoolBlock:
    return FusedPoolBlock(
        [b.branch1x1, b.branch5x5_1, b.branch3x3dbl_1, b.branch_pool],
        [b.branch5x5_2],
        [b.branch3x3dbl_2, b.branch3x3dbl_3],
    )


def fused_c(b: InceptionC) -> FusedPoolBlock:
    return FusedPoolBlock(
        [b.branch1x1, b.branch7x7_1, b.branch7x7dbl_1, b.branch_pool],
        [b.branch7x7_2, b.branch7x7_3],
        [b.branch7x7dbl_2, b.branch7x7dbl_3, b.branch7x7dbl_4, b.branch7x7dbl_5],
    )


class FusedB(nn.Module):
    def __init__(self, b: InceptionB) -> None:
        super().__init__()
        self.b3 = Chain([b.branch3x3])
        self.b3dbl = Chain([b.branch3x3dbl_1, b.branch3x3dbl_2, b.branch3x3dbl_3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.b3dbl(x), F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FusedD(nn.Module):
    def __init__(self, b: InceptionD) -> None:
        super().__init__()
        self.head, self.widths = fold_wide([b.branch3x3_1, b.branch7x7x3_1])
        self.b3 = Chain([b.branch3x3_2])
        self.b7 = Chain([b.branch7x7x3_2, b.branch7x7x3_3, b.branch7x7x3_4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h3, h7 = F.relu(self.head(x), inplace=True).split(self.widths, dim=1)
        return torch.cat([self.b3(h3), self.b7(h7), F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FusedE(nn.Module):
    def __init__(self, b: InceptionE) -> None:
        super().__init__()
        self.max_pool = b.max_pool
        heads = [b.branch1x1, b.branch3x3_1, b.branch3x3dbl_1]
        # Max pooling is not linear, so only the average-pool branch can swap with its convolution.
        self.head, self.widths = fold_wide(heads if self.max_pool else [*heads, b.branch_pool])
        self.pool_conv = Chain([b.branch_pool]) if self.max_pool else None
        self.b3a, self.b3b = Chain([b.branch3x3_2a]), Chain([b.branch3x3_2b])
        self.d = Chain([b.branch3x3dbl_2])
        self.da, self.db = Chain([b.branch3x3dbl_3a]), Chain([b.branch3x3dbl_3b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x).split(self.widths, dim=1)
        s, d = F.relu(h[1]), self.d(F.relu(h[2]))
        if self.pool_conv is not None:
            pool = self.pool_conv(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        else:
            pool = F.relu(_tf_avg_pool(h[3]), inplace=True)
        return torch.cat([F.relu(h[0]), self.b3a(s), self.b3b(s), self.da(d), self.db(d), pool], 1)


_FUSED = {InceptionA: fused_a, InceptionB: FusedB, InceptionC: fused_c, InceptionD: FusedD, InceptionE: FusedE}


class FusedTrunk(nn.Module):
    """`FIDInceptionV3.trunk` rewritten for inference: NCHW 299×299 input → the last feature map."""

    def __init__(self, net: FIDInceptionV3) -> None:
        super().__init__()
        self.stem1 = Chain([net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3])
        self.stem2 = Chain([net.Conv2d_3b_1x1, net.Conv2d_4a_3x3])
        names = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                 "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
        self.blocks = nn.ModuleList(_FUSED[type(getattr(net, n))](getattr(net, n)) for n in names)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem1(x), kernel_size=3, stride=2)
        x = F.max_pool2d(self.stem2(x), kernel_size=3, stride=2)
        for block in self.blocks:
            x = block(x)
        return x
