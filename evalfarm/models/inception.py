"""FID-InceptionV3: the TensorFlow 2015-12-05 graph ported to torch.

Module names are the state-dict keys of the canonical `pt_inception-2015-12-05-6726825d.pth`
(shared by pytorch-fid and torch-fidelity), so that file loads strictly. The graph differs from
torchvision's InceptionV3 where TensorFlow did: average pools exclude padding, the last block
max-pools its pool branch, and the classifier has 1008 outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL3_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm with TensorFlow's epsilon, ReLU."""

    def __init__(self, cin: int, cout: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 same-padded average pool divides by the number of real pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _conv_chain(cin: int, specs: list[tuple[int, dict]]) -> list[BasicConv2d]:
    layers, c = [], cin
    for cout, conv in specs:
        layers.append(BasicConv2d(c, cout, **conv))
        c = cout
    return layers


_K1 = {"kernel_size": 1}
_K3 = {"kernel_size": 3}
_K3P = {"kernel_size": 3, "padding": 1}
_K3S2 = {"kernel_size": 3, "stride": 2}
_K1x7 = {"kernel_size": (1, 7), "padding": (0, 3)}
_K7x1 = {"kernel_size": (7, 1), "padding": (3, 0)}
_K1x3 = {"kernel_size": (1, 3), "padding": (0, 1)}
_K3x1 = {"kernel_size": (3, 1), "padding": (1, 0)}


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, **_K1)
        self.branch5x5_1, self.branch5x5_2 = _conv_chain(cin, [(48, _K1), (64, {"kernel_size": 5, "padding": 2})])
        self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = _conv_chain(
            cin, [(64, _K1), (96, _K3P), (96, _K3P)]
        )
        self.branch_pool = BasicConv2d(cin, pool_features, **_K1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, **_K3S2)
        self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = _conv_chain(
            cin, [(64, _K1), (96, _K3P), (96, _K3S2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, **_K1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _conv_chain(
            cin, [(c7, _K1), (c7, _K1x7), (192, _K7x1)]
        )
        (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ) = _conv_chain(cin, [(c7, _K1), (c7, _K7x1), (c7, _K1x7), (c7, _K7x1), (192, _K1x7)])
        self.branch_pool = BasicConv2d(cin, 192, **_K1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _conv_chain(cin, [(192, _K1), (320, _K3S2)])
        self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4 = _conv_chain(
            cin, [(192, _K1), (192, _K1x7), (192, _K7x1), (192, _K3S2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch, as TensorFlow's graph has it)."""

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, **_K1)
        self.branch3x3_1 = BasicConv2d(cin, 384, **_K1)
        self.branch3x3_2a = BasicConv2d(384, 384, **_K1x3)
        self.branch3x3_2b = BasicConv2d(384, 384, **_K3x1)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _conv_chain(cin, [(448, _K1), (384, _K3P)])
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **_K1x3)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **_K3x1)
        self.branch_pool = BasicConv2d(cin, 192, **_K1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Maps normalized 299x299 RGB in [-1, 1) to (pool3 features, bias-free logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, **_K3S2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, **_K3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, **_K3P)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, **_K1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, **_K3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL3_DIM, NUM_LOGITS)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3 = self.trunk(x).mean(dim=(2, 3))
        # IS uses the logits without the classifier bias ("logits_unbiased"), as torch-fidelity does.
        logits = pool3 @ self.fc.weight.T
        return pool3, logits
