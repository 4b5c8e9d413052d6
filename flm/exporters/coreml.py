"""Core ML target: an ML program (`.mlpackage`) with the spec in its user metadata.

- `convert_to="mlprogram"`, `compute_precision=FLOAT32`, `minimum_deployment_target=iOS16`
  (macOS 13); the batch axis is a range 1..16 (`ct.RangeDim`). A tensor input declares that range
  in Core ML's own shape range; an image input has no batch field in Core ML, so the package also
  declares it in its user metadata (`flm.coreml.batch_range`, for both kinds), and the reference
  evaluator refuses a batch outside it, as Core ML does.
- Input (`--coreml-input`): `image` (default) takes a pixel buffer: Core ML's ImageType scales
  pixels by 1/255 and the exported graph itself does `(x - mean) / std` per channel, so the
  normalisation is exact (ImageType's own single `scale` cannot express ImageNet's per-channel
  std). `tensor` takes the same normalised float32 `[N, C, S, S]` as the ONNX file.
- Conversion goes through `torch.jit.trace` (coremltools 9.0 warns it was tested up to torch
  2.7; measured fine here, and every file is parity-checked anyway).

On macOS the parity check runs the saved package with `MLModel.predict` (CPU only, so the
FLOAT32 program runs in float32). Elsewhere it reloads the saved package from disk and runs it
with the reference evaluator in `flm.exporters.mil_eval`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from flm.coreml_io import import_coremltools, quiet_coremltools
from flm.errors import UsageError
from flm.geometry import swap_channels
from flm.exporters import (MAX_BATCH, TARGETS, describe, input_description, metadata,
                           output_descriptions, output_names)
from flm.exporters.mil_eval import MilProgram
from flm.exporters.mlpackage import BATCH_RANGE_KEY, declared_batch_range, read_package
from flm.spec import INPUT

log = logging.getLogger("flm")
INPUT_KINDS = ("image", "tensor")
DEFAULT_INPUT = "image"
DEPLOYMENT_TARGET = "iOS16"  # == macOS13: the first with FLOAT32 ML programs + flexible batch
PRECISIONS = ("float32", "float16")  # float16 exists for the negative control only


def export_coreml(model, path, *, decode: bool = True, coreml_input: str = DEFAULT_INPUT,
                  precision: str = "float32") -> Path:
    """Write `model` to `path` (must end in .mlpackage). No parity check here: see parity.verify."""
    import torch

    from flm.exporters.graph import ExportGraph

    if coreml_input not in INPUT_KINDS:
        raise UsageError(f"unknown --coreml-input {coreml_input!r}; known: {', '.join(INPUT_KINDS)}",
                         example="flm export best.pt --target coreml --coreml-input image")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown Core ML precision {precision!r}; known: {', '.join(PRECISIONS)}")
    ct = import_coremltools()
    path = Path(path)
    spec = model.spec
    graph = ExportGraph(model, decode=decode, normalise=coreml_input == "image")
    with torch.no_grad(), _quiet_conversion():
        traced = torch.jit.trace(graph, graph.example_input(), check_trace=False)
    shape = ct.Shape((ct.RangeDim(1, MAX_BATCH, default=1), spec.channels, spec.input_size, spec.input_size))
    if coreml_input == "image":
        layout = {"RGB": ct.colorlayout.RGB, "BGR": ct.colorlayout.BGR, "GRAY": ct.colorlayout.GRAYSCALE}
        inp = ct.ImageType(name=INPUT, shape=shape, scale=1 / 255.0, color_layout=layout[spec.color_order])
    else:
        inp = ct.TensorType(name=INPUT, shape=shape, dtype=np.float32)
    names = output_names(spec, decode)
    with _quiet_conversion():
        ml = ct.convert(traced, inputs=[inp], outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
                        convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                        compute_precision=ct.precision.FLOAT32 if precision == "float32" else ct.precision.FLOAT16)
    ml.author = "flm"
    ml.license = spec.licence
    ml.short_description = describe(spec)
    ml.version = spec.flm_version
    for key, value in metadata(spec, decode, coreml_input).items():
        ml.user_defined_metadata[key] = value
    ml.user_defined_metadata["flm.coreml.precision"] = precision
    ml.user_defined_metadata["flm.coreml.deployment_target"] = DEPLOYMENT_TARGET
    ml.user_defined_metadata[BATCH_RANGE_KEY] = json.dumps([1, MAX_BATCH])
    ml.input_description[INPUT] = input_description(spec, coreml_input)
    for name, text in output_descriptions(spec).items():
        if name in names:
            ml.output_description[name] = text
    ml.save(str(path))
    return path


@contextlib.contextmanager
def _quiet_conversion():
    """coremltools draws a progress bar per pass and warns about the torch version and the
    deprecated tracer; keep the user's terminal clean and keep the text for --debug."""
    noise = io.StringIO()
    try:
        with quiet_coremltools(), warnings.catch_warnings(), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        log.debug("coremltools: %s", noise.getvalue()[-4000:])


def open_coreml(path, runner: str = "auto"):
    """Open a saved .mlpackage for the parity check.

    runner: "auto" (MLModel.predict on macOS, else the reference evaluator), "coreml" or "reference".
    """
    from flm.exporters.onnx import check_io, read_spec
    from flm.exporters.parity import Exported

    path = Path(path)
    proto = read_package(path)
    meta = dict(proto.description.metadata.userDefined)
    spec = read_spec(meta, path)
    inputs = [i.name for i in proto.description.input]
    outputs = [o.name for o in proto.description.output]
    decode = check_io(path, spec, inputs, outputs)
    _, max_batch = declared_batch_range(proto, path)
    input_kind = "image" if proto.description.input[0].type.WhichOneof("Type") == "imageType" else "tensor"
    if runner == "auto":
        runner = "coreml" if sys.platform == "darwin" else "reference"
    if runner == "coreml":
        predict, how = _coreml_predictor(path, spec, input_kind, outputs), "Core ML MLModel.predict (macOS, CPU only)"
    elif runner == "reference":
        program = MilProgram(path, proto)

        def predict(x):
            # an ImageType input reaches the program as float pixels, exactly what Core ML feeds it
            return program.run({INPUT: x.astype(np.float32)})

        how = "reference MIL evaluator (numpy, saved package reloaded from disk)"
    else:
        raise UsageError(f"unknown Core ML runner {runner!r}; known: auto, coreml, reference")
    return Exported(path=path, target=TARGETS["coreml"].name, spec=spec, outputs=outputs, decode=decode,
                    input_kind=input_kind, runner=how, predict=predict, max_batch=max_batch, metadata=meta)


def _coreml_predictor(path, spec, input_kind, outputs):
    """MLModel.predict, one sample at a time (the batch range is checked by the reference path)."""
    ct = import_coremltools()
    ml = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    if input_kind == "image":
        try:
            from PIL import Image
        except ImportError:
            from flm.exporters import MissingExtra
            raise MissingExtra("feeding images to Core ML's MLModel.predict", ["Pillow"]) from None

    def predict(x):
        results = {name: [] for name in outputs}
        for sample in x:
            if input_kind == "image":
                pixels = np.clip(np.rint(sample), 0, 255).astype(np.uint8).transpose(1, 2, 0)
                if spec.color_order == "GRAY":
                    feed = Image.fromarray(pixels[:, :, 0], mode="L")
                else:  # Core ML reorders channels itself for a BGR layout; PIL images are RGB
                    feed = Image.fromarray(swap_channels(pixels, "RGB", spec.color_order), mode="RGB")
            else:
                feed = sample[None].astype(np.float32)
            res = ml.predict({INPUT: feed})
            for name in outputs:
                results[name].append(np.asarray(res[name], np.float32).reshape(-1, *np.shape(res[name])[1:]))
        return {name: np.concatenate(v) for name, v in results.items()}

    return predict
