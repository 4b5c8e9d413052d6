"""Export targets: ONNX and Core ML files that provably match the PyTorch model.

This module is the one table of targets (name, file suffix, options, the Python packages each
needs, and the functions that write and re-open a file), plus the names and axes every exported
file shares. It imports nothing heavy: torch, onnx and coremltools are imported by the target
modules, only once a command has validated its arguments against this table.

The contract apps rely on (the runtime is written against it):

- one input, `input`, float32 `[N, C, S, S]` already normalised with the spec's mean/std in the
  spec's colour order; the batch axis is dynamic (`batch`; Core ML: 1..16). A Core ML file
  may instead take an image (`--coreml-input image`): then the normalisation is in the graph;
- outputs, with decoding (the default): `landmarks` `[N, K, 2]` in model-input pixels (pixel
  centres at integers; exactly `model.decode(model(x))`), plus for heatmap models `heatmaps`
  `[N, K, h, w]` (logits) and `confidence` `[N, K]` (each point's heatmap peak probability, so
  an app needs no heatmap at run time). Without decoding a heatmap model gives only `heatmaps`;
  a coordinate model always gives `landmarks` (its decode is affine, so it is always in-graph);
  files written before `confidence` existed (`landmarks`, `heatmaps`) are still read;
- the spec JSON under `flm.spec` in ONNX `metadata_props` / Core ML user metadata, plus
  readable keys (author, licence, training data, `flm.outputs`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flm.errors import FlmError, UsageError
from flm.spec import CONFIDENCE, HEATMAPS, INPUT, LANDMARKS, SPEC_METADATA_KEY

# --------------------------------------------------------------------------- names and axes
# The I/O names are declared once, in `flm.spec` (the runtime reads them too), and re-exported
# here; the exporters write them and the checks read them back (STYLE habit 3).

BATCH_AXIS = "batch"  # the name of the dynamic axis 0 of the input and of every output
MAX_BATCH = 16  # Core ML batch range is 1..MAX_BATCH (ONNX is unbounded)
EXAMPLE_BATCH = 2  # torch.export needs an example batch >= 2 to keep the batch axis dynamic
DEFAULT_OPSET = 18  # torch 2.14's dynamo exporter writes an invalid Split at opset 17
DEFAULT_SAMPLES = 8

AUTHOR = "flm"
EXTRA_HINT = "pip install 'flm[export]'"


def output_names(spec, decode: bool = True) -> list[str]:
    """The outputs an exported file has, in order, for a model spec."""
    if spec.output == "heatmap":
        return [LANDMARKS, HEATMAPS, CONFIDENCE] if decode else [HEATMAPS]
    return [LANDMARKS]  # a regressor's decode is affine: always in the graph


def output_shapes(spec, decode: bool = True) -> dict[str, tuple]:
    """Shapes of each output with the batch axis as the string BATCH_AXIS."""
    k, h = spec.num_points, spec.heatmap_size
    shapes = {LANDMARKS: (BATCH_AXIS, k, 2), HEATMAPS: (BATCH_AXIS, k, h, h), CONFIDENCE: (BATCH_AXIS, k)}
    return {name: shapes[name] for name in output_names(spec, decode)}


def input_shape(spec) -> tuple:
    return (BATCH_AXIS, spec.channels, spec.input_size, spec.input_size)


def metadata(spec, decode: bool, input_kind: str = "tensor") -> dict[str, str]:
    """Readable key/values written next to the spec in every exported file."""
    outs = output_names(spec, decode)
    return {
        SPEC_METADATA_KEY: spec.to_json(),
        "flm.outputs": json.dumps(outs),
        "flm.input": input_kind,
        "flm.version": spec.flm_version,
        "author": AUTHOR,
        "licence": spec.licence,
        "training_data": spec.training_data or "unspecified",
        "description": describe(spec),
    }


def describe(spec) -> str:
    kind = "heatmap + soft-argmax" if spec.output == "heatmap" else "coordinate regression"
    return (f"flm {spec.preset}: {spec.num_points} face landmarks ({spec.scheme}) from a "
            f"{spec.input_size}x{spec.input_size} {spec.color_order} face crop, {kind}")


def input_description(spec, input_kind: str) -> str:
    s, c = spec.input_size, spec.channels
    if input_kind == "image":
        return (f"{s}x{s} {spec.color_order} face crop (pixels 0..255); normalisation is in the model. "
                f"Crop rule: square of {spec.crop.scale} x the landmark box, centred")
    return (f"float32 [N, {c}, {s}, {s}] face crop in {spec.color_order} order, (pixel/255 - mean)/std "
            f"with mean {list(spec.mean)} std {list(spec.std)}")


def output_descriptions(spec) -> dict[str, str]:
    s = spec.input_size
    return {
        LANDMARKS: (f"[N, {spec.num_points}, 2] landmark (x, y) in model-input pixels "
                    f"(0..{s - 1}, pixel centres at integers)"),
        HEATMAPS: (f"[N, {spec.num_points}, {spec.heatmap_size}, {spec.heatmap_size}] heatmap logits; "
                   f"soft-argmax gives the landmarks"),
        CONFIDENCE: (f"[N, {spec.num_points}] peak probability of each point's heatmap (softmax over the map): "
                     f"high for one sharp peak, low for a flat or split map"),
    }


# --------------------------------------------------------------------------- the table


class MissingExtra(FlmError):
    """An optional dependency a target needs is not installed."""

    def __init__(self, what: str, modules: list[str]):
        self.modules = modules
        super().__init__(f"{what} needs the Python package(s) {', '.join(modules)}, which are not "
                         f"installed; install them with: {EXTRA_HINT}")


@dataclass(frozen=True)
class Target:
    name: str
    suffix: str  # file suffix: how `flm verify` recognises a file
    filename: str  # the file `flm export` writes in --out
    options: tuple[str, ...]  # export options this target accepts
    needs: tuple[str, ...]  # importable modules export + verify need
    export: str  # "module:function" writing the file: f(model, path, **options)
    open: str  # "module:function" opening a written file for the parity check: f(path) -> Exported
    description: str

    def export_fn(self) -> Callable:
        return _resolve(self.export)

    def open_fn(self) -> Callable:
        return _resolve(self.open)


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("onnx", ".onnx", "model.onnx", ("decode", "opset", "lean"),
           ("torch", "onnx", "onnxscript", "onnxruntime"),
           "flm.exporters.onnx:export_onnx", "flm.exporters.onnx:open_onnx",
           "ONNX (opset 18, dynamic batch), verified with onnxruntime CPU"),
    Target("coreml", ".mlpackage", "model.mlpackage", ("decode", "coreml_input"),
           ("torch", "coremltools"),
           "flm.exporters.coreml:export_coreml", "flm.exporters.coreml:open_coreml",
           "Core ML ML program (FLOAT32, iOS16+/macOS13+, batch 1..16), verified with "
           "MLModel.predict on macOS or the reference MIL evaluator elsewhere"),
]}

ALL = "all"
EXPORT_EXAMPLE = "flm export runs/train/best.pt --target onnx   (targets: onnx, coreml, all)"


def resolve_targets(value: str) -> list[Target]:
    """`onnx`, `coreml` or `all` -> targets. Quotes a bad value; never guesses a close one."""
    if value == ALL:
        return list(TARGETS.values())
    if value not in TARGETS:
        raise UsageError(f"unknown export target {value!r}; known: {', '.join([*TARGETS, ALL])}",
                         example=EXPORT_EXAMPLE)
    return [TARGETS[value]]


def check_options(target: Target, options: dict) -> None:
    unknown = sorted(set(options) - set(target.options))
    if unknown:
        raise UsageError(f"target {target.name!r} has no option(s) {unknown}; it accepts {list(target.options)}",
                         example=EXPORT_EXAMPLE)


def check_needs(targets: list[Target]) -> None:
    """Fail before any work if a package a target needs is missing. Never installs anything."""
    for t in targets:
        missing = [m for m in t.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtra(f"the {t.name} target", missing)


def target_for_path(path) -> Target:
    """The target an exported file belongs to, from its suffix."""
    p = Path(path)
    for t in TARGETS.values():
        if p.name.endswith(t.suffix):
            return t
    raise UsageError(f"{str(path)!r} is not an exported model: expected a file ending in "
                     f"{' or '.join(t.suffix for t in TARGETS.values())}",
                     example="flm verify runs/export/model.onnx --against runs/train/best.pt")


def failed_path(final: Path, target: Target) -> Path:
    """Where a file that failed its parity check is kept for inspection: `model.failed.onnx`.

    It keeps the target suffix so Netron / Xcode / `flm verify` still open it.
    """
    final = Path(final)
    return final.with_name(final.name[: -len(target.suffix)] + ".failed" + target.suffix)


def _resolve(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
