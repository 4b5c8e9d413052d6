"""What goes inside an exported file: [normalise] -> model -> [decode], as one nn.Module.

The decode here is `LandmarkModel.decode` written with the spec's static sizes (the heatmap
side, K) instead of shapes read at run time: a traced `logits.shape[-1]` turns into integer
tensor arithmetic that Core ML cannot convert (`inverse` of an int32) and needless Shape ops in
ONNX. The maths and the order of operations are the same; the parity check compares every
export against `model.decode(model(x))` itself, so any drift between the two is caught.
"""

from __future__ import annotations

import torch
from torch import nn

from flm.errors import SpecError
from flm.exporters import EXAMPLE_BATCH
from flm.exporters.lean import lean_copy


class ExportGraph(nn.Module):
    """`lean`: the model as `flm.exporters.lean.lean_copy` lays it out (the ONNX file's)."""

    def __init__(self, model, decode: bool = True, normalise: bool = False, lean: bool = False):
        super().__init__()
        spec = model.spec
        self.model, self.spec = (lean_copy(model) if lean else model).eval(), spec
        self.decode_heatmaps = decode and spec.output == "heatmap"
        self.normalise = normalise
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).reshape(1, -1, 1, 1))
        if spec.output == "heatmap":
            self.register_buffer("cells", torch.arange(spec.heatmap_size, dtype=torch.float32))
        self.eval()
        self._check_shapes()

    def forward(self, x):
        spec = self.spec
        if self.normalise:  # image input: x holds pixels / 255 (Core ML's ImageType scale)
            x = (x - self.mean) / self.std
        raw = self.model(x)
        k = spec.num_points
        if spec.output == "heatmap":
            if not self.decode_heatmaps:
                return raw
            h = spec.heatmap_size
            p = torch.softmax(raw.reshape(-1, k, h * h), dim=-1).reshape(-1, k, h, h)
            xs = (p.sum(dim=2) * self.cells).sum(dim=-1)
            ys = (p.sum(dim=3) * self.cells).sum(dim=-1)
            stride = spec.input_size / h
            return (torch.stack([xs, ys], dim=-1) + 0.5) * stride - 0.5, raw, p.amax(dim=(2, 3))
        s = spec.input_size
        return raw.reshape(-1, k, 2) * s + (s - 1) / 2.0

    def example_input(self, batch: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        s = self.spec
        x = torch.randn(batch, s.channels, s.input_size, s.input_size, generator=g)
        return x.clamp(0, 1) if self.normalise else x

    @torch.no_grad()
    def _check_shapes(self) -> None:
        """The static sizes the decode uses must be the model's real output sizes."""
        s = self.spec
        raw = self.model(torch.zeros(1, s.channels, s.input_size, s.input_size))
        want = (1, s.num_points, s.heatmap_size, s.heatmap_size) if s.output == "heatmap" else (1, 2 * s.num_points)
        if tuple(raw.shape) != want:
            raise SpecError(f"{s.preset}: the model's raw output has shape {tuple(raw.shape)} but its spec "
                            f"promises {want}; the checkpoint's spec does not describe its model")
