"""The ONNX file's copy of a ShuffleNetV2 heatmap model: the same function, laid out for onnxruntime's CPU
convolutions.

onnxruntime runs convolutions fastest in its blocked channel layout (NCHWc: channels in blocks of 8 or 16),
and uses it only where a layer's channel counts fit; ShuffleNetV2 x1.0's stem (24 channels) and stage-2
halves (58) do not, and each unit's channel shuffle (Reshape, Transpose, Reshape, Split) moves the data
three or four times. `lean_copy` pads every such width up to a multiple of `BLOCK` with channels whose
weights are zero (so they add nothing), and does each shuffle and split as gathers of the channels where
they lie. Same outputs up to float rounding (the parity check compares the file with the model itself);
measured on flm-68-distilled (onnxruntime, one thread, batch 1): model card, "Lean export".
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

BLOCK = 16  # onnxruntime's NCHWc block with AVX-512 (8 with AVX2: a multiple of 16 suits both)


def lean_copy(model: nn.Module) -> nn.Module:
    """An evaluation-mode copy of `model` with its ShuffleNetV2 trunk padded and gathered (above); any
    other model as it is."""
    stages = [getattr(model, name, None) for name in ("stage2", "stage3", "stage4")]
    if not all(isinstance(s, nn.Sequential) for s in stages) or not hasattr(model, "stem"):
        return model
    lean = copy.deepcopy(model)
    conv, bn = lean.stem[0][0], lean.stem[0][1]
    stem = _padded(conv.out_channels)
    lean.stem[0][0], lean.stem[0][1] = _pad_conv(conv, conv.in_channels, stem), _pad_bn(bn, stem)
    lean.stage2 = LeanStage(model.stage2, stem)
    lean.stage3, lean.stage4 = LeanStage(model.stage3), LeanStage(model.stage4)
    return lean.eval()


def _padded(channels: int) -> int:
    return math.ceil(channels / BLOCK) * BLOCK


class LeanStage(nn.Module):
    """A torchvision ShuffleNetV2 stage (a stride-2 unit, then stride-1 units) as the same function: each
    half padded to `_padded` channels and every channel shuffle and split done as gathers. `width_in`:
    the channels of the input it is given, when a padded layer before it gives more than the stage's
    own input channels (the default)."""

    def __init__(self, stage: nn.Sequential, width_in: int | None = None):
        super().__init__()
        units = list(stage)
        width_in = width_in or units[0].branch1[0].in_channels
        half = units[0].branch2[-3].out_channels
        p = _padded(half)
        self.branch1 = _pad_branch(units[0].branch1, width_in, p)
        self.branches = nn.ModuleList([_pad_branch(units[0].branch2, width_in, p)]
                                      + [_pad_branch(u.branch2, p, p) for u in units[1:]])
        # a unit's concatenation holds its unshuffled output's channel k at lies[k] (each half padded);
        # the shuffle interleaves the halves, so the shuffled channel j lies at at[j]; the padding
        # gathers repeat channel 0 (the layers that read them weigh them 0)
        lies = np.r_[np.arange(half), p + np.arange(half)]
        at = lies[np.arange(2 * half).reshape(2, half).T.reshape(-1)]
        filler = np.zeros(p - half, dtype=np.int64)
        self.register_buffer("kept", torch.from_numpy(np.r_[at[:half], filler]))
        self.register_buffer("worked", torch.from_numpy(np.r_[at[half:], filler]))
        self.register_buffer("shuffled", torch.from_numpy(at.astype(np.int64)))
        self.eval()

    def forward(self, x):
        x = torch.cat([self.branch1(x), self.branches[0](x)], dim=1)
        for branch in self.branches[1:]:
            x = torch.cat([x.index_select(1, self.kept), branch(x.index_select(1, self.worked))], dim=1)
        return x.index_select(1, self.shuffled)


def _pad_branch(branch: nn.Sequential, width_in: int, width: int) -> nn.Sequential:
    """A unit's branch (convolutions, batch norms, ReLUs) taking `width_in` channels, its 1x1 convolutions
    giving `width`; the added channels' weights are zero, and so are the batch norms' outputs there."""
    layers, c = [], width_in
    for layer in branch:
        if isinstance(layer, nn.Conv2d):
            out = c if layer.groups > 1 else width
            layer, c = _pad_conv(layer, c, out), out
        elif isinstance(layer, nn.BatchNorm2d):
            layer = _pad_bn(layer, c)
        layers.append(layer)
    return nn.Sequential(*layers)


def _pad_conv(conv: nn.Conv2d, width_in: int, width: int) -> nn.Conv2d:
    """`conv` (no bias; depthwise or dense) for `width_in` input and `width` output channels."""
    depthwise = conv.groups > 1
    new = nn.Conv2d(width_in, width, conv.kernel_size, conv.stride, conv.padding,
                    groups=width if depthwise else 1, bias=False)
    weight = torch.zeros_like(new.weight)
    weight[:conv.weight.shape[0], :conv.weight.shape[1]] = conv.weight.detach()
    new.weight = nn.Parameter(weight)
    return new


def _pad_bn(bn: nn.BatchNorm2d, width: int) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(width, eps=bn.eps).eval()
    n = bn.num_features
    with torch.no_grad():
        new.weight.zero_()[:n] = bn.weight
        new.bias.zero_()[:n] = bn.bias
        new.running_mean.zero_()[:n] = bn.running_mean
        new.running_var.fill_(1.0)[:n] = bn.running_var
    return new
