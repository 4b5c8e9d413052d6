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
    """Write `model` (a LandmarkModel) to `path` as ONNX; `lean`: channel shuffles as gathers
    (`gather_channel_shuffles`). No parity check here: see parity.verify."""
    import onnx
    import torch

    from flm.exporters.graph import ExportGraph

    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is not supported: torch's exporter writes an invalid Split "
                         f"below opset {MIN_OPSET}", example="flm export best.pt --target onnx --opset 18")
    path = Path(path)
    graph = ExportGraph(model, decode=decode)
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
    if lean:
        log.debug("channel shuffles written as gathers: %d", gather_channel_shuffles(proto.graph))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


def gather_channel_shuffles(graph) -> int:
    """Write each channel shuffle in `graph` (ShuffleNetV2's Reshape to (N, g, C/g, H, W), Transpose of
    the two group axes, Reshape back to C channels) as one Gather of the channels in their shuffled
    order, and a shuffle whose only reader splits it in two halves (the next unit's split) as one
    Gather per half: the same numbers in 1-2 copies instead of 3-4 (onnxruntime, one thread: flm-68-distilled
    ~4 % less time a face, model card). Returns how many shuffles it rewrote."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    swaps, done = {}, set()
    for t in graph.node:
        chain = _shuffle_chain(t, producer, readers, consts)
        if chain is None:
            continue
        first, last, groups, split = chain
        c = consts[first.input[1]]
        order = np.arange(groups * int(c[2])).reshape(groups, -1).T.reshape(-1)  # shuffled channel j = order[j]
        parts = zip(split.output, np.split(order, 2)) if split is not None else [(last.output[0], order)]
        gathers = []
        for out, idx in parts:
            graph.initializer.append(numpy_helper.from_array(idx.astype(np.int64), f"{out}_channels"))
            gathers.append(helper.make_node("Gather", [first.input[0], f"{out}_channels"], [out], name=f"{out}_gather", axis=1))
        swaps[id(first)] = gathers
        done |= {id(first), id(t), id(last)} | ({id(split)} if split is not None else set())
    nodes = [g for n in graph.node if id(n) not in done or id(n) in swaps for g in swaps.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return len(swaps)


def _shuffle_chain(t, producer, readers, consts):
    """(first Reshape, last Reshape, groups, the halving Split or None) if node `t` is the Transpose of
    a channel shuffle whose intermediate results nothing else reads, else None."""
    perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
    first = producer.get(t.input[0])
    nxt = readers.get(t.output[0], [])
    if (t.op_type != "Transpose" or perm != [0, 2, 1, 3, 4] or first is None or first.op_type != "Reshape"
            or len(readers.get(first.output[0], [])) != 1 or len(nxt) != 1 or nxt[0].op_type != "Reshape"):
        return None
    shape, last = consts.get(first.input[1]), nxt[0]
    back = consts.get(last.input[1])
    if shape is None or back is None or len(shape) != 5 or len(back) != 4 or back[1] != shape[1] * shape[2]:
        return None
    split = readers.get(last.output[0], [])
    halves = (len(split) == 1 and split[0].op_type == "Split" and len(split[0].input) == 1
              and len(split[0].output) == 2 and all(a.name in ("axis", "num_outputs") for a in split[0].attribute)
              and next((a.i for a in split[0].attribute if a.name == "axis"), 0) == 1 and back[1] % 2 == 0)
    return first, last, int(shape[1]), split[0] if halves else None


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
