"""ONNX target: write a single-file ONNX model with the spec in its metadata; open one for checks.

Export uses torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), the maintained
route in torch 2.14, with an example batch of 2 and a dynamic `batch` Dim. Measured on this
machine: at opset 17 it writes an invalid ShuffleNet graph (`Split` with `num_outputs`), so the
default is opset 18; it writes weights to a side `.onnx.data` unless `external_data=False`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from flm.errors import ModelFileError, SpecError, UsageError
from flm.exporters import BATCH_AXIS, DEFAULT_OPSET, TARGETS, describe, metadata, output_names
from flm.spec import HEATMAPS, INPUT, LANDMARKS, SPEC_METADATA_KEY, ModelSpec

log = logging.getLogger("flm")
MIN_OPSET = 18


def export_onnx(model, path, *, decode: bool = True, opset: int = DEFAULT_OPSET, lean: bool = True) -> Path:
    """Write `model` (a LandmarkModel) to `path` as ONNX; `lean`: as `flm.exporters.lean` lays it out for
    onnxruntime (the default). No parity check here: see parity.verify."""
    import onnx
    import torch

    from flm.exporters.graph import ExportGraph

    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is not supported: torch's exporter writes an invalid Split "
                         f"below opset {MIN_OPSET}", example="flm export best.pt --target onnx --opset 18")
    path = Path(path)
    graph = ExportGraph(model, decode=decode, lean=lean)
    spec = model.spec
    names = output_names(spec, decode)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    noise = io.StringIO()  # the exporter prints its progress; keep it for --debug
    with torch.no_grad(), contextlib.redirect_stdout(noise), _quiet_loggers():
        program = torch.onnx.export(graph, (graph.example_input(),), dynamo=True, opset_version=opset,
                                    input_names=[INPUT], output_names=names,
                                    dynamic_shapes={"x": {0: batch}}, external_data=False,
                                    optimize=True, verbose=False)
    log.debug("torch.onnx.export: %s", noise.getvalue().strip())
    proto = program.model_proto
    proto.doc_string = describe(spec)
    proto.producer_name = "flm"
    proto.producer_version = spec.flm_version
    del proto.metadata_props[:]
    for key, value in metadata(spec, decode).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter and onnxscript's optimizer log every pass at INFO; show them only with --debug."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def open_onnx(path):
    """Open an exported ONNX file with onnxruntime (CPU) for the parity check."""
    import onnxruntime as ort

    from flm.exporters.parity import Exported

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "ONNX file not found",
                             example="runs/export/model.onnx, as written by flm export runs/train/best.pt --out runs/export")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises InvalidProtobuf / Fail / NoSuchFile ... for bad files
        raise ModelFileError(path, f"not a readable ONNX model ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]})") from None
    try:  # onnxruntime decodes metadata and names as UTF-8; a damaged file may hold other bytes
        meta = session.get_modelmeta().custom_metadata_map
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        dims = list(session.get_inputs()[0].shape) if inputs else []
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"not a readable ONNX model (metadata or names are not UTF-8: {e.reason} "
                                   f"at byte {e.start})") from None
    spec = read_spec(meta, path)
    decode = check_io(path, spec, inputs, outputs)
    want = [spec.channels, spec.input_size, spec.input_size]
    if len(dims) != 4 or dims[1:] != want:
        raise ModelFileError(path, f"input {INPUT!r} has shape {dims}, but its spec describes "
                                   f"[{BATCH_AXIS}, {', '.join(map(str, want))}]")

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            res = session.run(outputs, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})
        except Exception as e:  # onnxruntime's own error types
            raise ModelFileError(path, f"onnxruntime failed to run it on {x.shape} input "
                                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return dict(zip(outputs, res))

    return Exported(path=path, target=TARGETS["onnx"].name, spec=spec, outputs=outputs, decode=decode,
                    input_kind="tensor", runner=f"onnxruntime {ort.__version__} CPUExecutionProvider",
                    predict=predict, max_batch=None, metadata=dict(meta))


def read_spec(meta: dict, path) -> ModelSpec:
    if SPEC_METADATA_KEY not in meta:
        raise ModelFileError(path, f"not an flm model: no {SPEC_METADATA_KEY!r} entry in its metadata "
                                   f"(keys: {sorted(meta) or 'none'})")
    try:
        return ModelSpec.from_json(meta[SPEC_METADATA_KEY], source=str(path))
    except SpecError as e:
        raise ModelFileError(path, str(e)) from None


def check_io(path, spec: ModelSpec, inputs: list[str], outputs: list[str]) -> bool:
    """The file's input/output names must be the contract's; returns whether it decodes in-graph."""
    if inputs != [INPUT]:
        raise ModelFileError(path, f"inputs are {inputs}, expected [{INPUT!r}]")
    for decode in (True, False):
        if outputs == output_names(spec, decode):
            return decode if spec.output == "heatmap" else True
    if spec.output == "heatmap" and outputs == [LANDMARKS, HEATMAPS]:
        return True  # written before the confidence output existed
    raise ModelFileError(path, f"outputs are {outputs}, expected {output_names(spec, True)} "
                               f"(or [{HEATMAPS!r}] without decoding)")
