"""Measure a model artefact: its weights, their dtypes, its size and how many models it holds.

Every format gives the same `Measurement`:

* a **preset** (built at its default config on CPU) or an flm **checkpoint** (`.pt`, read with
  `torch.load(weights_only=True)`): every tensor of its state_dict(s). Its size is 4 bytes per
  weight value (parameters + floating-point buffers as float32: what the model needs), whatever
  the file on disk holds besides (optimizer state in a `last.pt`). A checkpoint holds one model
  per state_dict: its `state_dict`, each entry of a list such as `ensemble`, and any other
  top-level mapping of names to tensors; tensors outside any state_dict are still weights.
* an **ONNX** file (read with `load_external_data=False`): initializers, sparse initializers and
  tensors in node attributes (`Constant`, subgraphs, functions). External data files are read
  from the model's folder only — a location that escapes it is refused — and their sizes count.
  Size = the file plus its external data files on disk. An ONNX file is one model unless its
  graph falls apart into several disconnected networks that each read a graph input and hold
  weights (an ensemble averaged inside one graph still counts as one: enforce that rule on the
  checkpoint).
* a **Core ML** `.mlpackage` or `.mlmodel`: for an ML program, every tensor value in the MIL
  program (immediate constants) and every blob in the weight files it references (each blob
  records its own dtype, read from the blob header); for a neural network, every `WeightParams`
  (float32, float16, int8 or n-bit quantized). Pipelines count one model per sub-model with
  weights; an ML program one per function with weights. Size = everything on disk (the whole
  package, weight blobs included).

A tensor is a weight unless it is bookkeeping: strings, and integer/bool tensors of at most
`BOOKKEEPING_MAX_ELEMENTS` values (shapes, axes, BatchNorm's `num_batches_tracked`, zero points).
int8/uint8/int16/int4/... tensors are always weights: that is what quantized weights look like.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flm.errors import FlmError, ModelFileError, UsageError
from flm.fileio import size_of

FLOAT32_BYTES = 4
BOOKKEEPING_DTYPES = frozenset({"int32", "int64", "uint32", "uint64", "bool", "string"})
BOOKKEEPING_MAX_ELEMENTS = 1024
# Keys of an flm checkpoint that hold training state, not a model (see flm.pipeline.train).
TRAINING_STATE_KEYS = frozenset({"optimizer", "scheduler", "torch_rng"})

log = logging.getLogger("flm")


def is_bookkeeping(dtype: str, elements: int) -> bool:
    """Strings, and small integer/bool tensors (shapes, axes, counters): listed, never weights."""
    return dtype == "string" or (dtype in BOOKKEEPING_DTYPES and elements <= BOOKKEEPING_MAX_ELEMENTS)


@dataclass
class DtypeCount:
    tensors: int = 0
    elements: int = 0
    bytes: int = 0  # as stored


@dataclass
class Measurement:
    target: str
    kind: str  # preset | checkpoint | onnx | coreml
    size_basis: str  # "float32": 4 bytes per weight value; "disk": bytes on disk
    parameters: int = 0  # trainable parameters where known (preset/checkpoint), else weight values
    weight_tensors: int = 0
    weight_elements: int = 0
    disk_bytes: int | None = None
    models: int = 1
    model_labels: list[str] = field(default_factory=list)
    nonzero: bool | None = False  # any weight value non-zero (None: not looked at)
    weight_dtypes: dict[str, DtypeCount] = field(default_factory=dict)
    bookkeeping_dtypes: dict[str, DtypeCount] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def float32_bytes(self) -> int:
        return FLOAT32_BYTES * self.weight_elements

    @property
    def size_bytes(self) -> int:
        return self.float32_bytes if self.size_basis == "float32" else int(self.disk_bytes or 0)

    @property
    def size_basis_text(self) -> str:
        return "float32 parameters+buffers" if self.size_basis == "float32" else "size on disk"

    def add(self, dtype: str, elements: int, stored_bytes: int, nonzero: bool | None) -> None:
        """Record one tensor; bookkeeping tensors are listed apart and never count as weights."""
        if is_bookkeeping(dtype, elements):
            c = self.bookkeeping_dtypes.setdefault(dtype, DtypeCount())
        else:
            c = self.weight_dtypes.setdefault(dtype, DtypeCount())
            self.weight_tensors += 1
            self.weight_elements += elements
            if nonzero is None:
                self.nonzero = None if self.nonzero is not True else True
            elif nonzero:
                self.nonzero = True
        c.tensors += 1
        c.elements += elements
        c.bytes += stored_bytes

    def to_json(self) -> dict:
        return {
            "target": self.target, "kind": self.kind, "parameters": self.parameters,
            "weight_tensors": self.weight_tensors, "weight_elements": self.weight_elements,
            "float32_bytes": self.float32_bytes, "disk_bytes": self.disk_bytes,
            "size_bytes": self.size_bytes, "size_basis": self.size_basis_text, "mb_definition": "1 MB = 10^6 bytes",
            "models": self.models, "model_labels": self.model_labels, "nonzero_weights": self.nonzero,
            "weight_dtypes": {d: vars(c) for d, c in sorted(self.weight_dtypes.items())},
            "bookkeeping_dtypes": {d: vars(c) for d, c in sorted(self.bookkeeping_dtypes.items())},
            "files": self.files, "notes": self.notes,
        }


def measure(target: str) -> Measurement:
    """Measure a checkpoint, an ONNX file, a Core ML model or (if no such file) a preset name."""
    path = Path(target)
    if path.exists():
        if path.is_dir():
            if path.suffix.lower() == ".mlpackage" or (path / "Manifest.json").is_file():
                return measure_coreml(path)
            raise UsageError(f"{target} is a folder, not a model file (only a Core ML .mlpackage may be a folder)",
                             example="flm check-budget runs/train/best.pt")
        suffix = path.suffix.lower()
        if suffix in (".pt", ".pth"):
            return measure_checkpoint(path)
        if suffix == ".onnx":
            return measure_onnx(path)
        if suffix == ".mlmodel":
            return measure_coreml(path)
        raise UsageError(f"{target}: unknown model file type {suffix or '(no suffix)'!r}; "
                         "expected .pt, .onnx, .mlpackage or .mlmodel", example="flm check-budget model.onnx")
    from flm.pipeline.models import PRESETS

    if target in PRESETS:
        return measure_preset(target)
    raise UsageError(f"{target!r} is neither an existing file nor a model preset (presets: {', '.join(PRESETS)})",
                     example="flm check-budget runs/train/best.pt   or   flm check-budget shufflenet-heatmap")


# --------------------------------------------------------------------------- torch: presets, checkpoints


def _add_torch_tensor(m: Measurement, t) -> None:
    import torch

    data = t.int_repr() if t.is_quantized else t
    n = t.numel()
    nonzero = None if t.is_meta else bool(n and torch.count_nonzero(data).item())
    m.add(str(t.dtype).removeprefix("torch."), n, n * t.element_size(), nonzero)


def measure_module(module, target: str, kind: str = "preset") -> Measurement:
    m = Measurement(target, kind, "float32", models=1)
    for _, p in module.named_parameters():
        _add_torch_tensor(m, p.detach())
    for _, b in module.named_buffers():
        _add_torch_tensor(m, b)
    m.parameters = sum(p.numel() for p in module.parameters())
    return m


def measure_preset(name: str, img_size: int | None = None, width: float | None = None) -> Measurement:
    """A preset at its default config, built on CPU with its initial (random, non-zero) weights."""
    from flm.pipeline.models import build_model

    module = build_model(name, img_size, {"width": width} if width is not None else None)
    m = measure_module(module, name, "preset")
    m.notes.append("preset at its default configuration, freshly initialised")
    return m


def _tensors_in(value):
    """Every tensor inside a value (tensors, tuples/lists, dicts: packed quantized params nest)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v)


def _is_state_dict(value) -> bool:
    """A mapping of names to tensors (a value may be a tuple of tensors: quantized packed params)."""
    import torch

    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        return False
    return any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(t, torch.Tensor) for t in v))
               for v in value.values())


def checkpoint_models(ckpt: Mapping) -> list[tuple[str, Mapping]]:
    """The state_dicts a checkpoint payload holds, labelled by where they are ("state_dict",
    "ensemble[1]", ...). Training state (optimizer, scheduler, RNG) is not a model."""
    found, seen = [], set()
    for key, value in ckpt.items():
        if key in TRAINING_STATE_KEYS:
            continue
        candidates = [(str(key), value)] if isinstance(value, Mapping) else \
            [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else []
        for label, v in candidates:
            # the same object saved twice (state_dict and ensemble[0]) is one model: pickle keeps identity
            if _is_state_dict(v) and id(v) not in seen:
                seen.add(id(v))
                found.append((label, v))
    return found


def _parameter_names(ckpt: Mapping, path) -> set[str] | None:
    """Names of the trainable parameters of the preset a checkpoint's spec names (None if unknown)."""
    import torch

    from flm.pipeline.models import build_model
    from flm.spec import ModelSpec

    try:
        spec = ModelSpec.from_json(ckpt["spec"], source=str(path))
        with torch.device("meta"):
            module = build_model(spec.preset, spec=spec, options=ckpt.get("options") or {})
    except (FlmError, TypeError, KeyError, ValueError):
        return None
    return {n for n, _ in module.named_parameters()}


def measure_checkpoint(path) -> Measurement:
    from flm.pipeline.checkpoint import read_checkpoint

    path = Path(path)
    ckpt = read_checkpoint(path)
    m = Measurement(str(path), "checkpoint", "float32", disk_bytes=path.stat().st_size, files=[str(path)])
    models = checkpoint_models(ckpt)
    param_names = _parameter_names(ckpt, path)
    seen = set()
    for label, sd in models:
        seen.add(id(sd))
        for key, value in sd.items():
            for t in _tensors_in(value):
                _add_torch_tensor(m, t)
                if param_names is not None and key in param_names:
                    m.parameters += t.numel()
    # tensors outside any state_dict (and outside training state) still travel with the model
    stray = [(k, t) for k, v in ckpt.items() if k not in TRAINING_STATE_KEYS and id(v) not in seen
             and not (isinstance(v, (list, tuple)) and any(id(x) in seen for x in v))
             for t in _tensors_in(v)]
    for _, t in stray:
        _add_torch_tensor(m, t)
    if stray:
        m.notes.append(f"{len(stray)} tensor(s) outside any state_dict (keys {sorted({str(k) for k, _ in stray})}) "
                       "counted as weights")
    if param_names is None or (m.weight_elements and not m.parameters):
        m.parameters = m.weight_elements
        m.notes.append("parameters = all weight values (the checkpoint's preset could not be rebuilt)")
    m.models = len(models) or 1
    m.model_labels = [label for label, _ in models]
    if any(k in ckpt for k in TRAINING_STATE_KEYS):
        m.notes.append("training state (optimizer, scheduler, RNG) is not part of the model and not counted")
    return m


# --------------------------------------------------------------------------- ONNX

_ONNX_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "BFLOAT16": "bfloat16"}


def _onnx_dtype_name(data_type: int) -> str:
    from onnx import TensorProto

    name = TensorProto.DataType.Name(data_type)
    return _ONNX_DTYPES.get(name, name.lower())


def _onnx_graph_tensors(graph):
    """(tensor, where) for initializers, sparse initializers and node attribute tensors, recursively."""
    for t in graph.initializer:
        yield t, "initializer"
    for st in graph.sparse_initializer:
        yield st.values, "sparse initializer"
    yield from _onnx_node_tensors(graph.node)


def _onnx_node_tensors(nodes):
    from onnx import AttributeProto, TensorProto, helper

    for node in nodes:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                # plain-number Constants are tensors too (a float list can hold weights)
                floats = a.name.startswith("value_float")
                vals = list(a.floats or [a.f]) if floats else list(a.ints or [a.i])
                yield helper.make_tensor(node.output[0], TensorProto.FLOAT if floats else TensorProto.INT64,
                                         [len(vals)], vals), "Constant attribute"
            elif a.type == AttributeProto.TENSOR:
                yield a.t, f"{node.op_type} attribute"
            elif a.type == AttributeProto.TENSORS:
                for t in a.tensors:
                    yield t, f"{node.op_type} attribute"
            elif a.type == AttributeProto.SPARSE_TENSOR:
                yield a.sparse_tensor.values, f"{node.op_type} attribute"
            elif a.type == AttributeProto.GRAPH:
                yield from _onnx_graph_tensors(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _onnx_graph_tensors(g)


def _external_file(folder: Path, location: str, model_path: Path) -> Path:
    """The file an external-data `location` names, which must lie inside the model's folder."""
    rel = Path(location)
    target = (folder / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(folder):
        raise ModelFileError(model_path, f"external data location {location!r} escapes the model's folder "
                                         f"{folder}; refusing to read it (keep weight files beside the model)")
    if not target.is_file():
        raise ModelFileError(model_path, f"external data file {location!r} not found in {folder}")
    return target


def _np_nonzero(raw: bytes, np_dtype) -> bool:
    if np_dtype is not None and len(raw) % np.dtype(np_dtype).itemsize == 0:
        return bool(np.any(np.frombuffer(raw, dtype=np_dtype) != 0))
    return any(raw)


def _onnx_np_dtype(data_type: int):
    from onnx import helper

    try:
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return dt if dt.kind in "fiub" else None


def _onnx_is_weight(t) -> bool:
    return not is_bookkeeping(_onnx_dtype_name(t.data_type), math.prod(t.dims))


def _onnx_models(graph) -> int:
    """Disconnected networks in the top graph that each read a graph input and hold weights.

    Nodes are joined through the values one produces and another reads, and through weights
    they share; graph inputs do not join them (two networks may read the same image).
    """
    from onnx import AttributeProto

    weights = {t.name for t in graph.initializer if _onnx_is_weight(t)}
    weights |= {st.values.name for st in graph.sparse_initializer if _onnx_is_weight(st.values)}
    init = {t.name for t in graph.initializer} | {st.values.name for st in graph.sparse_initializer}
    inputs = {i.name for i in graph.input} - init
    parent = list(range(len(graph.node)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def subgraphs(node):
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield a.g
            elif a.type == AttributeProto.GRAPHS:
                yield from a.graphs

    def names_used(node):
        used = list(node.input)
        for g in subgraphs(node):  # outer-scope names read inside subgraphs
            for n in g.node:
                used += names_used(n)
        return used

    producer, weight_user, reads_input, holds_weights = {}, {}, set(), set()
    for i, node in enumerate(graph.node):
        for o in node.output:
            producer[o] = i
        own = list(_onnx_node_tensors([node]))  # Constant values, subgraph weights
        if any(_onnx_is_weight(t) for t, _ in own):
            holds_weights.add(i)
    for i, node in enumerate(graph.node):
        for name in names_used(node):
            if name in producer:
                parent[find(i)] = find(producer[name])
            if name in weights:
                holds_weights.add(i)
                if name in weight_user:  # nodes sharing a weight belong to one network
                    parent[find(i)] = find(weight_user[name])
                weight_user[name] = i
            if name in inputs:
                reads_input.add(i)
    return len({find(i) for i in reads_input} & {find(i) for i in holds_weights})


def measure_onnx(path) -> Measurement:
    try:
        import onnx
        from onnx import TensorProto, numpy_helper
    except ImportError:
        raise UsageError("measuring an ONNX file needs the onnx package", example="pip install 'flm[export]'") from None

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends for foreign/truncated files
        raise ModelFileError(path, f"not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    folder = path.parent.resolve()
    m = Measurement(str(path), "onnx", "disk")
    files = {path.resolve(): path.stat().st_size}
    tensors = list(_onnx_graph_tensors(model.graph))
    for f in model.functions:
        tensors += list(_onnx_node_tensors(f.node))
    for t, where in tensors:
        dtype = _onnx_dtype_name(t.data_type)
        n = math.prod(t.dims)
        np_dtype = _onnx_np_dtype(t.data_type)
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            if "location" not in info:
                raise ModelFileError(path, f"{where} {t.name!r} has external data without a location")
            file = _external_file(folder, info["location"], path)
            size = file.stat().st_size
            offset = int(info.get("offset", 0))
            length = int(info.get("length", size - offset))
            if offset < 0 or length < 0 or offset + length > size:
                raise ModelFileError(path, f"{where} {t.name!r}: external data {info['location']!r} bytes "
                                           f"{offset}..{offset + length} lie beyond its end ({size} bytes)")
            with open(file, "rb") as fh:
                fh.seek(offset)
                raw = fh.read(length)
            files[file] = size
            m.add(dtype, n, length, _np_nonzero(raw, np_dtype))
        else:
            try:
                arr = numpy_helper.to_array(t)
                nonzero = bool(np.any(arr != 0)) if arr.dtype.kind != "O" else bool(arr.size)
                stored = len(t.raw_data) or arr.nbytes
            except Exception:  # exotic dtypes numpy cannot hold: look at the raw bytes
                nonzero, stored = any(t.raw_data), len(t.raw_data)
            m.add(dtype, n, stored, nonzero)
    m.files = [str(f) for f in files]
    m.disk_bytes = sum(files.values())
    m.parameters = m.weight_elements
    m.models = max(1, _onnx_models(model.graph))
    if m.models > 1:
        m.model_labels = [f"{m.models} disconnected networks"]
    return m


# --------------------------------------------------------------------------- Core ML

# MILBlob BlobDataType (coremltools mlmodel/src/MILBlob/Blob/BlobDataType.hpp): name, bits per value.
BLOB_DTYPES = {1: ("float16", 16), 2: ("float32", 32), 3: ("uint8", 8), 4: ("int8", 8), 5: ("bfloat16", 16),
               6: ("int16", 16), 7: ("uint16", 16), 8: ("int4", 4), 9: ("uint1", 1), 10: ("uint2", 2),
               11: ("uint4", 4), 12: ("uint3", 3), 13: ("uint6", 6), 14: ("int32", 32), 15: ("uint32", 32),
               16: ("float8e4m3fn", 8), 17: ("float8e5m2", 8)}
BLOB_SENTINEL = 0xDEADBEEF
BLOB_ALIGNMENT = 64
_NP_BY_NAME = {"float16": np.float16, "float32": np.float32}


def _coreml_proto():
    try:
        quiet = logging.getLogger("coremltools")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it warns about untested torch versions and missing macOS libs
        try:
            from coremltools.proto import MIL_pb2, Model_pb2
        finally:
            quiet.setLevel(level)
    except ImportError:
        raise UsageError("measuring a Core ML model needs coremltools", example="pip install 'flm[export]'") from None
    return Model_pb2, MIL_pb2


def read_blob_file(path: Path, model_path) -> dict[int, tuple[str, int, bytes]]:
    """Every blob of a MIL weight file: {metadata offset: (dtype, values, data)}.

    Layout (MILBlob StorageFormat.hpp): a 64-byte header (uint32 count, uint32 version), then per
    blob a 64-byte metadata record (uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size in bytes,
    uint64 data offset, reserved) and its data, each 64-byte aligned.
    """
    data = path.read_bytes()
    if len(data) < 64:
        raise ModelFileError(model_path, f"weight file {path.name} is truncated ({len(data)} bytes)")
    count, version = struct.unpack_from("<II", data, 0)
    if version != 2:
        raise ModelFileError(model_path, f"weight file {path.name}: blob storage version {version}, expected 2")
    blobs, pos = {}, BLOB_ALIGNMENT
    for i in range(count):
        if pos + 64 > len(data):
            raise ModelFileError(model_path, f"weight file {path.name}: blob {i} of {count} lies beyond its end")
        sentinel, code, size, offset = struct.unpack_from("<IIQQ", data, pos)
        if sentinel != BLOB_SENTINEL or offset + size > len(data):
            raise ModelFileError(model_path, f"weight file {path.name}: corrupt blob record at byte {pos}")
        if code not in BLOB_DTYPES:
            raise ModelFileError(model_path, f"weight file {path.name}: unknown blob dtype code {code} at byte {pos}")
        name, bits = BLOB_DTYPES[code]
        blobs[pos] = (name, size * 8 // bits, data[offset:offset + size])
        pos = -(-(offset + size) // BLOB_ALIGNMENT) * BLOB_ALIGNMENT
    return blobs


class _CoreMLReader:
    def __init__(self, m: Measurement, root: Path, model_path: Path):
        self.m, self.root, self.model_path = m, root.resolve(), model_path
        self.Model_pb2, self.MIL_pb2 = _coreml_proto()
        self.blob_files: dict[Path, dict] = {}

    def weight_file(self, model_dir: Path, name: str) -> Path:
        rel = name.removeprefix("@model_path/")
        target = (model_dir / rel).resolve()
        if Path(rel).is_absolute() or not target.is_relative_to(self.root):
            raise ModelFileError(self.model_path, f"weight file {name!r} escapes the model's folder; refusing it")
        if not target.is_file():
            raise ModelFileError(self.model_path, f"weight file {name!r} not found ({target})")
        return target

    def model(self, spec, model_dir: Path) -> int:
        """Add the weights of a Model spec; return how many models with weights it holds."""
        kind = spec.WhichOneof("Type")
        if kind == "mlProgram":
            return self.program(spec.mlProgram, model_dir)
        if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
            before = self.m.weight_tensors
            self.weight_params(getattr(spec, kind))
            return int(self.m.weight_tensors > before)
        if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
            pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
            return sum(self.model(sub, model_dir) for sub in pipe.models)
        raise ModelFileError(self.model_path, f"Core ML model type {kind!r} is not a neural network or an ML "
                                              "program; check-budget measures those only")

    # ML program ------------------------------------------------------------
    def program(self, prog, model_dir: Path) -> int:
        with_weights = 0
        refs: list[tuple[str, int, str]] = []  # (file, offset, declared dtype)
        for fname in sorted(prog.functions):
            before = (self.m.weight_tensors, len(refs))
            for block in prog.functions[fname].block_specializations.values():
                self.block(block, refs)
            with_weights += (self.m.weight_tensors, len(refs)) != before
        for file in sorted({f for f, _, _ in refs}):
            path = self.weight_file(model_dir, file)
            if path not in self.blob_files:
                self.blob_files[path] = read_blob_file(path, self.model_path)
                for dtype, n, raw in self.blob_files[path].values():  # every blob, referenced or not
                    np_dtype = _NP_BY_NAME.get(dtype)
                    nonzero = bool(np.any(np.frombuffer(raw, np_dtype) != 0)) if np_dtype else any(raw)
                    self.m.add(dtype, n, len(raw), nonzero)
        for file, offset, declared in refs:
            blobs = self.blob_files[self.weight_file(model_dir, file)]
            if offset not in blobs:
                raise ModelFileError(self.model_path, f"MIL program refers to blob at offset {offset} of {file}, "
                                                      "which holds none")
            if blobs[offset][0] != declared:
                raise ModelFileError(self.model_path, f"blob at offset {offset} of {file} holds {blobs[offset][0]} "
                                                      f"but the program declares {declared}")
        return with_weights

    def block(self, block, refs) -> None:
        for op in block.operations:
            for value in op.attributes.values():
                self.value(value, refs)
            for arg in op.inputs.values():
                for binding in arg.arguments:
                    if binding.WhichOneof("binding") == "value":
                        self.value(binding.value, refs)
            for sub in op.blocks:
                self.block(sub, refs)

    def value(self, v, refs) -> None:
        if v.type.WhichOneof("type") != "tensorType":
            return
        tt = v.type.tensorType
        dtype = self.MIL_pb2.DataType.Name(tt.dataType).lower()
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            refs.append((v.blobFileValue.fileName, int(v.blobFileValue.offset), dtype))
            return
        if which != "immediateValue" or v.immediateValue.WhichOneof("value") != "tensor":
            return
        tensor = v.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if kind is None:
            values = []
        elif kind == "bytes":
            values = tensor.bytes.values
        else:
            values = list(getattr(tensor, kind).values)
        dims = [d.constant.size for d in tt.dimensions if d.WhichOneof("dimension") == "constant"]
        n = math.prod(dims) if len(dims) == len(tt.dimensions) else len(values)
        if kind == "bytes":
            np_dtype = _NP_BY_NAME.get(dtype)
            stored, nonzero = len(values), _np_nonzero(values, np_dtype) if np_dtype else any(values)
        elif kind == "strings":
            stored, nonzero = sum(len(s) for s in values), bool(values)
        else:
            stored, nonzero = n * max(1, _bits(dtype) // 8), any(x != 0 for x in values)
        self.m.add(dtype, n, stored, nonzero)

    # neural network --------------------------------------------------------
    def weight_params(self, msg) -> None:
        """Walk a neural-network spec; add every WeightParams it holds."""
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            if fd.message_type.GetOptions().map_entry:
                items = [v for v in value.values() if hasattr(v, "ListFields")]
            else:
                repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
                items = list(value) if repeated else [value]
            for item in items:
                if item.DESCRIPTOR.full_name == "CoreML.Specification.WeightParams":
                    self.add_weight_params(item)
                else:
                    self.weight_params(item)

    def add_weight_params(self, wp) -> None:
        if len(wp.floatValue):
            vals = np.asarray(wp.floatValue, dtype=np.float32)
            self.m.add("float32", vals.size, vals.nbytes, bool(np.any(vals != 0)))
        if len(wp.float16Value):
            self.m.add("float16", len(wp.float16Value) // 2, len(wp.float16Value),
                       _np_nonzero(wp.float16Value, np.float16))
        if len(wp.rawValue):
            bits = wp.quantization.numberOfBits if wp.HasField("quantization") else 8
            name = f"uint{bits} (quantized)" if wp.HasField("quantization") else "raw bytes"
            self.m.add(name, len(wp.rawValue) * 8 // max(1, bits), len(wp.rawValue), any(wp.rawValue))
        if len(wp.int8RawValue):
            self.m.add("int8", len(wp.int8RawValue), len(wp.int8RawValue), any(wp.int8RawValue))


def _bits(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 8


def _mlpackage_root_model(package: Path) -> Path:
    import json

    manifest = package / "Manifest.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        item = info["itemInfoEntries"][info["rootModelIdentifier"]]
        rel = item["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(package, f"not a readable .mlpackage (Manifest.json: {type(e).__name__}: {e})") from None
    data = (package / "Data").resolve()
    target = (data / rel).resolve()
    if not target.is_relative_to(package.resolve()):
        raise ModelFileError(package, f"Manifest.json root model path {rel!r} escapes the package; refusing it")
    if not target.is_file():
        raise ModelFileError(package, f"root model {rel!r} named by Manifest.json is missing")
    return target


def measure_coreml(path) -> Measurement:
    path = Path(path)
    if path.is_dir():
        model_file, root = _mlpackage_root_model(path), path
    else:
        model_file, root = path, path.parent
    m = Measurement(str(path), "coreml", "disk")
    reader = _CoreMLReader(m, root, path)
    spec = reader.Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except Exception as e:  # google.protobuf.message.DecodeError for foreign/truncated files
        raise ModelFileError(path, f"not a readable Core ML model ({type(e).__name__}: {str(e)[:200]})") from None
    if spec.WhichOneof("Type") is None:
        raise ModelFileError(path, "not a Core ML model (the spec names no model type)")
    m.models = max(1, reader.model(spec, model_file.parent))
    if path.is_dir():
        m.disk_bytes = size_of(path)
        m.files = [str(path)]
    else:
        files = {path.resolve(): path.stat().st_size}
        files.update({p: p.stat().st_size for p in reader.blob_files})
        m.disk_bytes = sum(files.values())
        m.files = [str(f) for f in files]
    m.parameters = m.weight_elements
    return m
