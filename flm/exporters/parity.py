"""Parity: does an exported file give the same outputs and landmarks as the PyTorch model?

The same real inputs (dataset crops, or generated faces) go to PyTorch and to the exported
file, re-opened from disk. The report lists every output with its max |diff| and tolerance,
and the largest landmark displacement in pixels at the model's input resolution — the unit a
user cares about. A file passes only if every output is within tolerance AND no landmark moves
more than MAX_DISPLACEMENT_PX.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from flm.errors import ParityError
from flm.geometry import soft_argmax, swap_channels, to_model_input
from flm.spec import CONFIDENCE, HEATMAPS, LANDMARKS, ModelSpec

log = logging.getLogger("flm")

MAX_DISPLACEMENT_PX = 0.01  # at the model's input resolution


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # an output passes where |export - torch| <= atol + rtol * |torch| everywhere


# Why these numbers: both sides compute in float32 (~6e-8 relative per rounding) but in a
# different order (oneDNN vs MLAS vs numpy/BLAS; BN folded into the conv weights by the
# converters; fused ops). Over ~60 layers that reorder costs ~1e-6..1e-5 relative, which we
# measured at <= 1e-6 on heatmap logits of order 1..10. atol 1e-4 / rtol 1e-3 leaves ~100x room
# for that and still fails a float16 program (~5e-4 relative per op, compounding) and any real
# change of the weights. Landmarks are pixel coordinates (0..S-1, S <= 224): float32 resolves
# them to ~2e-5 px, so 1e-3 px absolute (plus 1e-5 relative) is tight yet robust; the
# displacement limit below (0.01 px) is the user-facing bar. Core ML is checked either by
# MLModel.predict (CPU, float32) or by the numpy reference evaluator; both are float32 too, so it
# gets the same numbers.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "onnx": {HEATMAPS: Tolerance(atol=1e-4, rtol=1e-3), LANDMARKS: Tolerance(atol=1e-3, rtol=1e-5),
             CONFIDENCE: Tolerance(atol=1e-5, rtol=1e-3)},
    "coreml": {HEATMAPS: Tolerance(atol=1e-4, rtol=1e-3), LANDMARKS: Tolerance(atol=1e-3, rtol=1e-5),
               CONFIDENCE: Tolerance(atol=1e-5, rtol=1e-3)},
}


@dataclass
class Exported:
    """An exported file re-opened from disk, ready to run."""

    path: Path
    target: str
    spec: ModelSpec
    outputs: list[str]
    decode: bool
    input_kind: str  # "tensor" (normalised float32) or "image" (pixels 0..255, normalised in-graph)
    runner: str  # which code path runs it, for the report
    predict: Callable[[np.ndarray], dict[str, np.ndarray]]
    max_batch: int | None
    metadata: dict


@dataclass
class ParityInputs:
    pixels: np.ndarray  # (N, C, S, S) float32 holding uint8 pixel values, in the spec's colour order
    tensor: np.ndarray  # (N, C, S, S) float32 normalised: what PyTorch (and a tensor input) gets
    source: str

    def __len__(self):
        return len(self.tensor)


@dataclass
class OutputCheck:
    name: str
    shape: tuple
    max_abs_diff: float
    atol: float
    rtol: float
    tolerance_used: float  # max over elements of |diff| / (atol + rtol |torch|); <= 1 passes
    passed: bool


@dataclass
class ParityReport:
    target: str
    path: str
    against: str
    runner: str
    inputs: str
    samples: int
    outputs: list[OutputCheck] = field(default_factory=list)
    displacement_px: float = float("nan")  # largest landmark displacement, model-input pixels
    displacement_limit_px: float = MAX_DISPLACEMENT_PX
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        bad = [f"{o.name} max |diff| {o.max_abs_diff:.3g} exceeds atol {o.atol:g} + rtol {o.rtol:g}"
               for o in self.outputs if not o.passed]
        if not self.displacement_px <= self.displacement_limit_px:
            bad.append(f"landmarks move up to {self.displacement_px:.4g} px (limit {self.displacement_limit_px} px)")
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(bad)
        return f"parity {self.target} {self.path} vs {self.against}: {verdict}"


# --------------------------------------------------------------------------- inputs


def make_inputs(spec: ModelSpec, samples: int, data: str | None = None, seed: int = 0) -> ParityInputs:
    """`samples` real model inputs: crops from dataset `data` (FORMAT:PATH), else generated faces."""
    from flm.pipeline.augment import make_crop

    if samples < 1:
        from flm.errors import UsageError
        raise UsageError(f"--samples must be at least 1, got {samples}", example="flm verify model.onnx --against best.pt --samples 8")
    crops = []
    if data:
        from flm.pipeline.data import open_dataset
        from flm.pipeline.evaluate import point_subset

        ds = open_dataset(data)
        idx = point_subset(spec, ds)
        picks = np.unique(np.linspace(0, len(ds) - 1, min(samples, len(ds))).round().astype(int))
        for i in picks:
            s = ds.samples[i]
            pts = s.points if idx is None else s.points[idx]
            crops.append(make_crop(s.load(), pts, spec, None, None)[0])
        source = f"{len(crops)} crops from {data}"
    else:
        crops, source = _generated_faces(spec, samples, seed)
    pixels = np.stack([_in_colour_order(c, spec) for c in crops])  # (N, S, S, C) uint8
    tensor = np.stack([to_model_input(p if spec.channels == 3 else p[:, :, 0], spec.channels, spec.mean, spec.std)
                       for p in pixels])
    return ParityInputs(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), np.float32), tensor, source)


def _in_colour_order(rgb_crop: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """An RGB uint8 crop -> (S, S, C) in what the model takes (exactly as CropDataset converts it)."""
    if spec.channels == 1:
        return cv2.cvtColor(rgb_crop, cv2.COLOR_RGB2GRAY)[:, :, None]
    return swap_channels(rgb_crop, spec.color_order)


def _generated_faces(spec: ModelSpec, n: int, seed: int):
    """Crops of the built-in synthetic faces; structured random faces if that set is unavailable."""
    from flm.pipeline.augment import make_crop

    try:
        from flm.pipeline.data.synthetic import synthetic_dataset
    except ImportError:
        synthetic_dataset = None
    if synthetic_dataset is not None:
        ds = synthetic_dataset(n, seed)
        crops = []
        for s in ds.samples[:n]:
            pts = s.points[36:48] if spec.scheme == "eyes12" and ds.scheme == "ibug68" else s.points
            crops.append(make_crop(s.load(), pts, spec, None, None)[0])
        return crops, f"{len(crops)} generated faces (flm synthetic set, seed {seed})"
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        img, box = _structured_face(rng)
        crops.append(make_crop(img, box, spec, None, None)[0])
    return crops, f"{n} generated face-like images (seed {seed})"


def _structured_face(rng: np.random.Generator):
    """A face-like image (skin ellipse, eyes, brows, nose, mouth on a textured background)."""
    h = w = 256
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    img = base + rng.uniform(-40, 40, 3) * (xx[..., None] / w) + rng.normal(0, 6, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    cx, cy = rng.uniform(110, 146, 2)
    fw, fh = rng.uniform(50, 70), rng.uniform(65, 90)
    skin = tuple(float(v) for v in rng.uniform([120, 80, 60], [240, 200, 170]))
    cv2.ellipse(img, (int(cx), int(cy)), (int(fw), int(fh)), rng.uniform(-15, 15), 0, 360, skin, -1, cv2.LINE_AA)
    for side in (-1, 1):
        ex, ey = cx + side * fw * 0.4, cy - fh * 0.2
        cv2.ellipse(img, (int(ex), int(ey)), (int(fw * 0.16), int(fh * 0.07)), 0, 0, 360, (245, 245, 245), -1, cv2.LINE_AA)
        cv2.circle(img, (int(ex), int(ey)), int(fh * 0.06), tuple(float(v) for v in rng.uniform(20, 120, 3)), -1, cv2.LINE_AA)
        cv2.line(img, (int(ex - fw * 0.2), int(ey - fh * 0.16)), (int(ex + fw * 0.2), int(ey - fh * 0.18)), (60, 40, 30), 3, cv2.LINE_AA)
    cv2.line(img, (int(cx), int(cy - fh * 0.1)), (int(cx + 4), int(cy + fh * 0.2)), (90, 60, 50), 2, cv2.LINE_AA)
    cv2.ellipse(img, (int(cx), int(cy + fh * 0.5)), (int(fw * 0.35), int(fh * 0.08)), 0, 0, 180, (150, 40, 50), -1, cv2.LINE_AA)
    box = np.array([[cx - fw, cy - fh * 0.6], [cx + fw, cy + fh]])
    return img, box


# --------------------------------------------------------------------------- the check


def reference_outputs(model, inputs: ParityInputs) -> dict[str, np.ndarray]:
    """PyTorch's outputs: `model(x)`, `model.decode(model(x))` and (heatmap models) each point's
    heatmap peak probability, float32, eval mode."""
    import torch

    model.eval()
    with torch.no_grad():
        raw = model(torch.from_numpy(inputs.tensor))
        landmarks = model.decode(raw)
    out = {LANDMARKS: landmarks.numpy().astype(np.float32)}
    if model.spec.output == "heatmap":
        out[HEATMAPS] = raw.numpy().astype(np.float32)
        out[CONFIDENCE] = torch.softmax(raw.flatten(2), dim=-1).amax(dim=-1).numpy().astype(np.float32)
    return out


def run_exported(exported: Exported, inputs: ParityInputs) -> dict[str, np.ndarray]:
    x = inputs.pixels if exported.input_kind == "image" else inputs.tensor
    step = exported.max_batch or len(x)
    chunks = [exported.predict(x[i:i + step]) for i in range(0, len(x), step)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in exported.outputs}


def check(exported: Exported, model, inputs: ParityInputs, against: str = "model",
          reference: dict | None = None) -> ParityReport:
    """Compare an exported file with the PyTorch model on `inputs`; never raises on a mismatch."""
    _check_same_spec(exported, model)
    ref = reference if reference is not None else reference_outputs(model, inputs)
    got = run_exported(exported, inputs)
    report = ParityReport(target=exported.target, path=str(exported.path), against=str(against),
                          runner=exported.runner, inputs=inputs.source, samples=len(inputs))
    tolerances = TOLERANCES[exported.target]
    for name in exported.outputs:
        a, b = np.asarray(got[name], np.float64), np.asarray(ref[name], np.float64)
        tol = tolerances[name]
        if a.shape != b.shape:
            report.outputs.append(OutputCheck(name, tuple(a.shape), float("inf"), tol.atol, tol.rtol, float("inf"), False))
            continue
        diff = np.abs(a - b)
        used = diff / (tol.atol + tol.rtol * np.abs(b))
        finite = bool(np.isfinite(a).all())
        report.outputs.append(OutputCheck(
            name, tuple(a.shape), float(diff.max()) if finite else float("inf"), tol.atol, tol.rtol,
            float(used.max()) if finite else float("inf"), finite and bool((used <= 1.0).all())))
    if LANDMARKS in got:
        ours, theirs = got[LANDMARKS], ref[LANDMARKS]
    else:  # heatmaps only: decode both sides with the same numpy soft-argmax the runtime uses
        s = exported.spec.input_size
        ours, theirs = soft_argmax(got[HEATMAPS], s), soft_argmax(ref[HEATMAPS], s)
    if np.shape(ours) == np.shape(theirs) and np.isfinite(ours).all():
        report.displacement_px = float(np.linalg.norm(np.asarray(ours, np.float64) - theirs, axis=-1).max())
    else:
        report.displacement_px = float("inf")
    report.passed = all(o.passed for o in report.outputs) and report.displacement_px <= MAX_DISPLACEMENT_PX
    return report


def verify(exported: Exported, model, inputs: ParityInputs, against: str = "model") -> ParityReport:
    """`check`, raising ParityError (which carries the report) if the file does not match."""
    report = check(exported, model, inputs, against)
    if not report.passed:
        raise ParityError(report.summary(), report)
    return report


def _check_same_spec(exported: Exported, model) -> None:
    mine, theirs = exported.spec.to_dict(), model.spec.to_dict()
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "flm_version")
    if differ:
        raise ParityError(f"{exported.path}: its spec differs from the checkpoint's in "
                          f"{', '.join(f'{k} ({mine.get(k)!r} vs {theirs.get(k)!r})' for k in differ)}; "
                          f"it was not exported from this model")


# --------------------------------------------------------------------------- presentation


def report_table(report: ParityReport):
    """The parity report as a rich table: one row per output, then the landmark displacement."""
    from rich.table import Table

    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    t = Table(title=f"{verdict} {report.target} parity: {report.path}",
              caption=f"vs {report.against} on {report.inputs}\nran with {report.runner}",
              caption_justify="left")
    for col, justify in (("output", "left"), ("shape", "left"), ("max |diff|", "right"),
                         ("tolerance", "right"), ("used", "right"), ("ok", "center")):
        t.add_column(col, justify=justify)
    yes, no = "[green]yes[/]", "[red]no[/]"
    for o in report.outputs:
        t.add_row(o.name, "x".join(map(str, o.shape)), f"{o.max_abs_diff:.2e}", f"{o.atol:g} + {o.rtol:g}|ref|",
                  f"{100 * o.tolerance_used:.1f} %", yes if o.passed else no)
    ok = report.displacement_px <= report.displacement_limit_px
    t.add_row("landmark move", "px", f"{report.displacement_px:.2e}", f"{report.displacement_limit_px:g} px",
              f"{100 * report.displacement_px / report.displacement_limit_px:.1f} %", yes if ok else no)
    return t
