"""Test helpers for the runtime tests: generated 68-point faces and ONNX files with an flm spec.

Faces are drawn here (no files from ../shared): a parametric 68-point shape in the iBUG
order, rendered with OpenCV as a shaded face with dark brows and eyes — enough structure for
OpenCV's Haar cascade to fire and for a tiny model to learn in a few hundred steps.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def template_68() -> np.ndarray:
    """A frontal 68-point face in a unit frame: x in [-1, 1] (jaw ends), y down, nose tip near 0."""
    pts = np.zeros((68, 2))
    # jaw 0..16: from the left ear at eye height, round the chin, to the right ear
    for i in range(17):
        a = math.pi * (1.0 - i / 16.0)  # pi .. 0
        pts[i] = (math.cos(a), -0.30 + 1.05 * math.sin(a) ** 0.8 if i not in (0, 16) else -0.30)
    pts[:17, 1] = -0.30 + 1.05 * np.sin(np.linspace(0, math.pi, 17)) ** 0.9
    pts[:17, 0] = -np.cos(np.linspace(0, math.pi, 17)) * np.where(np.abs(np.linspace(-1, 1, 17)) > 0.5, 1.0, 0.92)
    # brows 17..21 (left) and 22..26 (right)
    for i in range(5):
        t = i / 4.0
        pts[17 + i] = (-0.80 + 0.62 * t, -0.62 - 0.12 * math.sin(math.pi * (0.3 + 0.7 * t)))
        pts[22 + i] = (0.18 + 0.62 * t, -0.62 - 0.12 * math.sin(math.pi * (1.0 - 0.7 * t)))
    # nose bridge 27..30, nostrils 31..35
    for i in range(4):
        pts[27 + i] = (0.0, -0.48 + 0.16 * i)
    for i in range(5):
        pts[31 + i] = (-0.20 + 0.10 * i, 0.10 + 0.04 * (1 - abs(i - 2) / 2))
    # eyes 36..41 and 42..47: corner, two upper, corner, two lower
    for base, cx in ((36, -0.45), (42, 0.45)):
        for j, a in enumerate((math.pi, 2 * math.pi / 3 + math.pi / 1.5, math.pi / 3 + math.pi, 0,
                               math.pi / 3, 2 * math.pi / 3)):
            pts[base + j] = (cx + 0.20 * math.cos(a), -0.36 + 0.09 * math.sin(a))
    # mouth outer 48..59, inner 60..67
    for j in range(12):
        a = math.pi + 2 * math.pi * j / 12  # start at the left corner, go over the top
        pts[48 + j] = (0.42 * math.cos(a), 0.42 + 0.13 * math.sin(a))
    for j in range(8):
        a = math.pi + 2 * math.pi * j / 8
        pts[60 + j] = (0.30 * math.cos(a), 0.42 + 0.05 * math.sin(a))
    pts[:, 1] *= 1.2  # real landmark boxes are about as tall as wide (Haar's cues need it too)
    return pts


def render_face(rng: np.random.Generator, size: int = 160, face: float | None = None, centre=None,
                angle: float | None = None, background: np.ndarray | None = None):
    """(RGB uint8 image, (68, 2) landmarks) of one generated face."""
    img = (background.copy() if background is not None else
           np.clip(rng.normal(rng.uniform(60, 200), 18, (size, size, 3)), 0, 255).astype(np.uint8))
    h, w = img.shape[:2]
    half = face if face is not None else rng.uniform(0.22, 0.30) * min(h, w)
    cx, cy = centre if centre is not None else (w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.06, 0.06) * h)
    ang = math.radians(angle if angle is not None else rng.uniform(-12, 12))
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    t = template_68() + rng.normal(0, 0.015, (68, 2))
    t[:, 0] *= rng.uniform(0.9, 1.08)
    pts = (t * half) @ rot.T + (cx, cy)
    skin = np.array([rng.uniform(150, 235), rng.uniform(110, 190), rng.uniform(80, 160)])
    dark = tuple(int(v) for v in rng.uniform(10, 50, 3))

    def poly(idx):
        return np.round(pts[idx] * 16).astype(np.int32)

    # head: an ellipse through the jaw, up to the forehead
    head_c = (cx + 0.0, cy) + rot @ np.array([0, -0.15 * half])
    cv2.ellipse(img, tuple(np.round(head_c * 16).astype(int)), (int(1.02 * half * 16), int(1.25 * half * 16)),
                math.degrees(ang), 0, 360, tuple(int(v) for v in skin * 0.75), -1, cv2.LINE_AA, 4)
    cv2.fillPoly(img, [poly(list(range(17)) + [26, 25, 24, 23, 22, 21, 20, 19, 18, 17])],
                 tuple(int(v) for v in skin), cv2.LINE_AA, 4)
    # shading of the eye sockets and either side of the nose: Haar's cues
    for idx in (range(36, 42), range(42, 48)):
        c = pts[list(idx)].mean(axis=0)
        cv2.ellipse(img, tuple(np.round(c * 16).astype(int)), (int(0.30 * half * 16), int(0.17 * half * 16)),
                    math.degrees(ang), 0, 360, tuple(int(v) for v in skin * 0.55), -1, cv2.LINE_AA, 4)
    for idx in (range(17, 22), range(22, 27)):
        cv2.polylines(img, [poly(list(idx))], False, dark, max(2, int(0.07 * half)), cv2.LINE_AA, 4)
    for idx in (range(36, 42), range(42, 48)):
        cv2.fillPoly(img, [poly(list(idx))], (235, 235, 235), cv2.LINE_AA, 4)
        c = pts[list(idx)].mean(axis=0)
        cv2.circle(img, tuple(np.round(c * 16).astype(int)), int(0.075 * half * 16), dark, -1, cv2.LINE_AA, 4)
    cv2.polylines(img, [poly(list(range(27, 31)))], False, tuple(int(v) for v in skin * 0.6),
                  max(1, int(0.03 * half)), cv2.LINE_AA, 4)
    cv2.polylines(img, [poly(list(range(31, 36)))], False, tuple(int(v) for v in skin * 0.45),
                  max(1, int(0.04 * half)), cv2.LINE_AA, 4)
    cv2.fillPoly(img, [poly(list(range(48, 60)))], (int(rng.uniform(150, 200)), 50, 60), cv2.LINE_AA, 4)
    cv2.fillPoly(img, [poly(list(range(60, 68)))], (60, 20, 25), cv2.LINE_AA, 4)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return img, pts.astype(np.float32)


# seeds of `faces_image` whose face OpenCV's Haar cascade finds (checked by the tests that use them)
HAAR_SEEDS = tuple(range(8))


def faces_image(seed=0, n=1, size=(360, 480)):
    """A BGR image with `n` generated faces side by side, and their (n, 68, 2) landmarks."""
    rng = np.random.default_rng(seed)
    h, w = size
    bg = np.clip(rng.normal(120, 15, (h, w, 3)), 0, 255).astype(np.uint8)
    pts = []
    for i in range(n):
        bg, p = render_face(rng, face=0.42 * w / (2 * n), centre=((i + 0.5) * w / n, h / 2), angle=0, background=bg)
        pts.append(p)
    return cv2.cvtColor(bg, cv2.COLOR_RGB2BGR), np.stack(pts)


# --------------------------------------------------------------------------- ONNX files with an flm spec


def add_spec_metadata(path, spec_json: str | None) -> None:
    """Write (or with None, leave out) the `flm.spec` ONNX metadata entry, as the exporter does."""
    import onnx

    from flm.spec import SPEC_METADATA_KEY

    m = onnx.load(str(path))
    del m.metadata_props[:]
    if spec_json is not None:
        p = m.metadata_props.add()
        p.key, p.value = SPEC_METADATA_KEY, spec_json
    onnx.save(m, str(path))


def export_onnx(model, path, decode: bool = True, spec_json: str | None = "from-model", batch: str | int = "dynamic"):
    """Export an flm torch model with `flm.exporters` where this checkout has it; otherwise
    (and for a fixed batch of 1, which the exporter does not write) by hand in the same layout:
    input `input` [N, C, S, S]; output `landmarks` [N, K, 2] in input pixels (decode=True) or
    `heatmaps` logits (decode=False); spec JSON in metadata `flm.spec`."""
    if batch == "dynamic" and spec_json == "from-model":
        try:
            from flm.exporters.onnx import export_onnx as flm_export_onnx
        except ImportError:  # exporters not in this checkout: export the same layout here
            flm_export_onnx = None
        if flm_export_onnx is not None:
            return flm_export_onnx(model.eval(), path, decode=decode)

    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            raw = self.m(x)
            return self.m.decode(raw) if decode else raw

    spec = model.spec
    model = model.eval()
    out_name = "landmarks" if decode else "heatmaps"
    x = torch.zeros(1, spec.channels, spec.input_size, spec.input_size)
    axes = {"input": {0: "batch"}, out_name: {0: "batch"}} if batch == "dynamic" else None
    with torch.no_grad():
        torch.onnx.export(Wrapped(model), (x,), str(path), input_names=["input"], output_names=[out_name],
                          dynamic_axes=axes, dynamo=False, opset_version=17)
    add_spec_metadata(path, spec.to_json() if spec_json == "from-model" else spec_json)
    return path


def dot_finder_onnx(path, size: int = 64, channels: int = 1, heatmap: bool = False, temperature: float = 3.0):
    """A one-point 'landmark model' with known behaviour: the soft-argmax of the input's brightness.

    On an image holding one bright blob it returns the blob centre in model-input pixels, so
    a runtime that crops, normalises and maps back correctly returns the blob centre in image
    pixels. `heatmap=True` exports the raw maps (the --no-decode layout) instead.
    """
    import torch

    from flm.pipeline.models import soft_argmax
    from flm.spec import CropRule, ModelSpec

    spec = ModelSpec(preset="dot-finder", num_points=1, scheme="dot1", input_size=size, channels=channels,
                     color_order="RGB" if channels == 3 else "GRAY", mean=(0.5,) * channels,
                     std=(0.25,) * channels, output="heatmap" if heatmap else "coords",
                     heatmap_size=size if heatmap else None, crop=CropRule(scale=1.25))

    class DotFinder(torch.nn.Module):
        def forward(self, x):
            g = x.sum(dim=1, keepdim=True) * temperature
            return g if heatmap else soft_argmax(g, size)

    m = DotFinder()
    m.spec = spec
    m.decode = lambda raw: raw
    return export_onnx(m, path, decode=True, spec_json=spec.to_json()) if not heatmap else _export_raw(m, path, spec)


def _export_raw(m, path, spec):
    import torch

    x = torch.zeros(1, spec.channels, spec.input_size, spec.input_size)
    torch.onnx.export(m, (x,), str(path), input_names=["input"], output_names=["heatmaps"],
                      dynamic_axes={"input": {0: "batch"}, "heatmaps": {0: "batch"}}, dynamo=False, opset_version=17)
    add_spec_metadata(path, spec.to_json())
    return path


def blob_image(h: int, w: int, centre, sigma: float = 2.0, color: bool = False) -> np.ndarray:
    """Black image with one Gaussian blob at sub-pixel `centre` (x, y), uint8 (gray or BGR)."""
    ys, xs = np.mgrid[0:h, 0:w]
    g = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))
    img = np.round(255 * g).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2) if color else img
