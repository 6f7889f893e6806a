"""The inference rewrite of FID-InceptionV3 computes the same function as the canonical graph.

In float64 the rewrites are exact algebra, so the two graphs agree to float64 rounding; any wrong weight,
channel order, bias or pool placement would show as a difference many orders of magnitude larger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evalfarm.models import FIDInceptionV3
from evalfarm.models.fused import FusedTrunk, fold, fold_wide
from evalfarm.models.resize import normalize, resize_tf_bilinear


@pytest.fixture(scope="module")
def net(weights_path: Path) -> FIDInceptionV3:
    net = FIDInceptionV3()
    net.load_state_dict(torch.load(weights_path, weights_only=True))
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return normalize(resize_tf_bilinear(torch.randint(0, 256, (2, 3, 24, 24), generator=g).float()))


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fused_trunk_equals_the_canonical_trunk_in_float64(net: FIDInceptionV3, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = net.double().trunk(inputs.double())
        fused = FusedTrunk(net)(inputs.double())
    net.float()
    assert fused.shape == expected.shape == (2, 2048, 8, 8)
    assert rel_max_diff(fused, expected) < 1e-12


def test_fused_trunk_in_float32_differs_from_the_canonical_one_only_by_rounding(
    net: FIDInceptionV3, inputs: torch.Tensor
) -> None:
    with torch.no_grad():
        exact = net.double().trunk(inputs.double()).mean(dim=(2, 3))
        net.float()
        canonical = net.trunk(inputs).mean(dim=(2, 3)).double()
        fused = FusedTrunk(net)(inputs).mean(dim=(2, 3)).double()
    # The fused graph is no further from the float64 result than the canonical float32 graph is (with a margin
    # of 2x for rounding that happens to fall differently).
    assert rel_max_diff(fused, exact) < 2 * max(rel_max_diff(canonical, exact), 1e-6)


def test_fold_puts_batchnorm_into_the_convolution(net: FIDInceptionV3) -> None:
    layer = net.Mixed_5b.branch5x5_2
    x = torch.randn(1, layer.conv.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = layer.bn(layer.conv(x.float()).double().float()).double()
        folded = fold(layer).double()(x)
    assert rel_max_diff(folded, expected) < 1e-5


def test_fold_wide_stacks_outputs_in_the_order_given(net: FIDInceptionV3) -> None:
    block = net.Mixed_6b
    parts = [block.branch1x1, block.branch7x7_1, block.branch7x7dbl_1, block.branch_pool]
    wide, widths = fold_wide(parts)
    assert widths == [192, 128, 128, 192]
    x = torch.randn(1, 768, 5, 5)
    with torch.no_grad():
        pieces = wide(x).split(widths, dim=1)
        for piece, layer in zip(pieces, parts, strict=True):
            np.testing.assert_allclose(piece.numpy(), fold(layer)(x).numpy(), rtol=1e-5, atol=1e-5)
