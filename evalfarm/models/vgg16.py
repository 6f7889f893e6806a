"""VGG16 up to its second fully connected layer, as torch-fidelity 0.4.0 builds it from torchvision's `vgg16`.

torch-fidelity loads a torchvision `vgg16` state dict (its default is `vgg16-397923af.pth`,
`VGG16_Weights.IMAGENET1K_V1`), deletes classifier modules 6, 5 and 4 (last Linear, Dropout, ReLU) and
reads `fc2` (the second Linear's output) or `fc2_relu`; `fc2_relu` is its default layer for every metric
(IS, FID, KID and PRC alike). Dropout is inactive in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

LAYERS = ("fc2_relu", "fc2")  #: torch-fidelity's provided features; the first is its default for every metric
FC2_DIM = 4096


class VGG16FC2(nn.Module):
    """ImageNet-normalized NCHW images (224x224) → fc2 or fc2_relu [N, 4096]; keys are torchvision's."""

    def __init__(self, net: torchvision.models.VGG, layer: str = "fc2_relu") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"VGG16 layer must be one of {LAYERS}, got {layer!r}")
        self.layer = layer
        self.features, self.avgpool = net.features, net.avgpool
        self.classifier = net.classifier[:4]  # Linear, ReLU, Dropout, Linear: keys classifier.0 and classifier.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
        return F.relu(x) if self.layer == "fc2_relu" else x


def vgg16_from_state_dict(state: dict[str, torch.Tensor], layer: str = "fc2_relu") -> VGG16FC2:
    """Load torchvision's full `vgg16` layout strictly (the 1000-class head included), then cut after fc2.

    Raises `RuntimeError` (from `load_state_dict`) on missing, unexpected or misshapen keys.
    """
    with torch.device("meta"):  # no random initialisation of 138M parameters that are overwritten anyway
        net = torchvision.models.vgg16(weights=None)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return VGG16FC2(net, layer)
