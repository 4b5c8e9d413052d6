"""Measure a model artefact: its weights, their dtypes, its size and how many models it holds.

Every format gives the same `Measurement`:

* a **preset** (built at its default config on CPU) or an flm **checkpoint** (`.pt`, read with
  `torch.load(weights_only=True)`): every tensor of its state_dict(s). Its size is 4 bytes per
  weight value (parameters + floating-point buffers as float32: what the model needs), whatever
  the file on disk holds besides (optimizer state in a `last.pt`). Models are counted by walking
  the whole payload (dicts, lists, tuples, at any depth): every mapping of names to tensors is a
  state_dict, and each is one model. The checkpoint's own `state_dict` is compared with the
  parameters and buffers of the preset rebuilt from its spec: a tensor the model does not have
  (e.g. `member1.*`, a second copy under another prefix) or of another shape, and any tensor
  outside a state_dict, is a weight the model does not use and fails the `models` rule, named.
  Training state (optimizer, scheduler, RNG) is not a model, but may only hold what training
  state holds: counters, the RNG state, and per parameter a few tensors of that parameter's shape.
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
`BOOKKEEPING_MAX_ELEMENTS` values that are used only as bookkeeping. In an ONNX graph or a MIL
program that means every use reads it as a shape, axes, counts or indices (Reshape's shape,
Unsqueeze's axes, Slice's starts, Gather's indices into values computed from the input, conv
strides ...), directly or through ops whose results are themselves used only so (a Concat of
shape pieces); an integer tensor that is cast and multiplied, or fed to a MatMul, is a weight.
In a checkpoint it means one of the model's own integer buffers (BatchNorm's
`num_batches_tracked`). int8/uint8/int16/int4/... tensors are always weights: that is what
quantized weights look like.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flm.bundled import is_model_name, shipped_paths
from flm.coreml_io import blob_at, import_coremltools, read_blob_file
from flm.errors import FlmError, ModelFileError, UsageError
from flm.fileio import size_of

FLOAT32_BYTES = 4
BOOKKEEPING_DTYPES = frozenset({"int32", "int64", "uint32", "uint64", "bool", "string"})
BOOKKEEPING_MAX_ELEMENTS = 1024
# Keys of an flm checkpoint that hold training state, not a model (see flm.pipeline.train).
TRAINING_STATE_KEYS = frozenset({"optimizer", "scheduler", "torch_rng"})

log = logging.getLogger("flm")


def is_bookkeeping(dtype: str, elements: int, bookkeeping_use: bool = True) -> bool:
    """Strings, and small integer/bool tensors used only as shapes, axes, indices or counters
    (`bookkeeping_use`, decided by the format's reader): listed, never weights."""
    small_ints = dtype in BOOKKEEPING_DTYPES and elements <= BOOKKEEPING_MAX_ELEMENTS
    return dtype == "string" or (small_ints and bookkeeping_use)


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
    # tensors beside the model that it does not use (checkpoints): a second model or smuggled capacity
    unused_weights: list[str] = field(default_factory=list)

    @property
    def float32_bytes(self) -> int:
        return FLOAT32_BYTES * self.weight_elements

    @property
    def size_bytes(self) -> int:
        return self.float32_bytes if self.size_basis == "float32" else int(self.disk_bytes or 0)

    @property
    def size_basis_text(self) -> str:
        return "float32 parameters+buffers" if self.size_basis == "float32" else "size on disk"

    def add(self, dtype: str, elements: int, stored_bytes: int, nonzero: bool | None,
            bookkeeping_use: bool = True) -> None:
        """Record one tensor; bookkeeping tensors are listed apart and never count as weights."""
        if is_bookkeeping(dtype, elements, bookkeeping_use):
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
            "models": self.models, "model_labels": self.model_labels, "unused_weights": self.unused_weights,
            "nonzero_weights": self.nonzero,
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
    shipped = shipped_paths() if is_model_name(target) else {}
    if target in shipped:  # a model flm ships, by name (no torch needed)
        return measure_onnx(shipped[target])
    _import_torch(f"preset {target!r} (there is no file of that name)")
    from flm.pipeline.models import PRESETS

    if target in PRESETS:
        return measure_preset(target)
    raise UsageError(f"{target!r} is neither an existing file, a model flm ships ({', '.join(shipped_paths())}) nor "
                     f"a model preset ({', '.join(PRESETS)})",
                     example="flm check-budget runs/train/best.pt   or   flm check-budget flm-68-distilled")


# --------------------------------------------------------------------------- torch: presets, checkpoints

# Per parameter, how many tensors of its shape an optimizer may keep (AdamW with amsgrad keeps 3).
OPTIMIZER_TENSORS_PER_PARAMETER = 3


def _import_torch(what: str):
    try:
        import torch
    except ImportError:
        raise UsageError(f"measuring {what} needs torch, which this install lacks (the base install is the "
                         "torch-free runtime)", example="pip install 'flm[train]'") from None
    return torch


def _add_torch_tensor(m: Measurement, t, bookkeeping_use: bool = True) -> None:
    import torch

    data = t.int_repr() if t.is_quantized else t
    n = t.numel()
    nonzero = None if t.is_meta else bool(n and torch.count_nonzero(data).item())
    m.add(str(t.dtype).removeprefix("torch."), n, n * t.element_size(), nonzero, bookkeeping_use)


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
    _import_torch("a preset")
    from flm.pipeline.models import build_model, preset_options

    module = build_model(name, img_size, preset_options(width))
    m = measure_module(module, name, "preset")
    m.notes.append("preset at its default configuration, freshly initialised")
    return m


def _children(value, label: str) -> list[tuple[str, object]]:
    if isinstance(value, Mapping):
        return [(f"{label}.{k}" if label else str(k), v) for k, v in value.items()]
    return [(f"{label}[{i}]", v) for i, v in enumerate(value)]


def _labelled_tensors(value, label: str = ""):
    """(where, tensor) for every tensor inside a value: tensors, lists/tuples and dicts, nested."""
    import torch

    if isinstance(value, torch.Tensor):
        yield label, value
    elif isinstance(value, (Mapping, list, tuple)):
        for where, v in _children(value, label):
            yield from _labelled_tensors(v, where)


def _tensors_in(value):
    return (t for _, t in _labelled_tensors(value))


def _is_tensor_value(value) -> bool:
    """A tensor, or a tuple holding one (quantized packed params)."""
    import torch

    return isinstance(value, torch.Tensor) or (isinstance(value, tuple) and
                                               any(isinstance(t, torch.Tensor) for t in value))


def _is_state_dict(value) -> bool:
    """A mapping of names to tensors."""
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        return False
    return any(_is_tensor_value(v) for v in value.values())


def checkpoint_contents(ckpt: Mapping) -> tuple[list[tuple[str, Mapping]], list[tuple[str, object]]]:
    """Every state_dict anywhere in a checkpoint payload (a mapping of names to tensors, at any
    depth of dicts, lists and tuples) and every tensor outside one, each labelled by where it is
    ("state_dict", "members.a", "ensemble[1]"). The same object saved twice is one (pickle keeps
    identity). Training state (optimizer, scheduler, RNG) is left out: see _training_state_extras."""
    import torch

    models, stray, seen = [], [], set()

    def walk(value, label):
        if isinstance(value, torch.Tensor):
            stray.append((label, value))
            return
        if not isinstance(value, (Mapping, list, tuple)) or id(value) in seen:
            return
        seen.add(id(value))
        state_dict = _is_state_dict(value)
        if state_dict:
            models.append((label, value))
        for where, v in _children(value, label):
            if not (state_dict and _is_tensor_value(v)):  # a state_dict's own tensors are measured with it
                walk(v, where)

    for key, value in ckpt.items():
        if key not in TRAINING_STATE_KEYS:
            walk(value, str(key))
    return models, stray


def _rebuilt_model(ckpt: Mapping, path) -> tuple[dict, set[str]]:
    """The preset a checkpoint's spec and build options describe, rebuilt on the meta device:
    its state_dict (key -> meta tensor: shape and dtype) and the names of its parameters."""
    import torch

    from flm.pipeline.models import build_model
    from flm.spec import ModelSpec

    try:
        spec = ModelSpec.from_json(ckpt["spec"], source=str(path))
        with torch.device("meta"):
            module = build_model(spec.preset, spec=spec, options=ckpt.get("options") or {})
    except (FlmError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise ModelFileError(path, f"its spec cannot be rebuilt into a model here ({e}), so its weights "
                                   "cannot be checked against that model") from None
    return dict(module.state_dict()), {n for n, _ in module.named_parameters()}


def _unused_keys(state_dict: Mapping, expected: dict) -> list[str]:
    """Keys of a state_dict holding tensors the model has no tensor of that shape for."""
    import torch

    return [k for k, v in state_dict.items() if _is_tensor_value(v) and
            (k not in expected or not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]


def _training_state_extras(ckpt: Mapping, expected: dict, param_names: set[str]) -> list[str]:
    """Tensors in training state that training state does not hold: anything but counters (one
    value), the RNG state, and per parameter a few optimizer tensors of a parameter's shape."""
    import torch

    shapes = {tuple(expected[n].shape) for n in param_names}
    rng = torch.get_rng_state()
    extras, shaped = [], []
    for key in sorted(TRAINING_STATE_KEYS & set(ckpt)):
        for label, t in _labelled_tensors(ckpt[key], key):
            if t.numel() <= 1 or (label == "torch_rng" and t.dtype == rng.dtype and t.shape == rng.shape):
                continue
            (shaped if key == "optimizer" and tuple(t.shape) in shapes else extras).append(label)
    return extras + shaped[OPTIMIZER_TENSORS_PER_PARAMETER * len(param_names):]


def measure_checkpoint(path) -> Measurement:
    _import_torch("a checkpoint")
    from flm.budgets import some_of
    from flm.pipeline.checkpoint import read_checkpoint

    path = Path(path)
    ckpt = read_checkpoint(path)
    main = ckpt["state_dict"]
    if not isinstance(main, Mapping):
        raise ModelFileError(path, f"its state_dict is a {type(main).__name__}; expected a mapping of "
                                   "parameter names to tensors")
    expected, param_names = _rebuilt_model(ckpt, path)
    models, stray = checkpoint_contents(ckpt)
    m = Measurement(str(path), "checkpoint", "float32", disk_bytes=path.stat().st_size, files=[str(path)])
    for _, sd in models:
        for key, value in sd.items():
            own = expected.get(key) if sd is main else None  # an integer tensor is bookkeeping only
            for t in _tensors_in(value):                     # where the model has an integer buffer
                _add_torch_tensor(m, t, own is None or not own.is_floating_point())
                if own is not None and key in param_names:
                    m.parameters += t.numel()
    for _, t in stray:
        _add_torch_tensor(m, t)
    if stray:
        m.notes.append(f"{len(stray)} tensor(s) outside any state_dict ({some_of([w for w, _ in stray])}) "
                       "counted as weights")
    m.unused_weights = ([f"state_dict[{k!r}]" for k in _unused_keys(main, expected)] + [w for w, _ in stray]
                        + _training_state_extras(ckpt, expected, param_names))
    missing = [k for k in expected if k not in main]
    if missing:
        m.notes.append(f"{len(missing)} of the model's tensors are missing from its state_dict "
                       f"({some_of(missing)}): it would not load")
    if m.weight_elements and not m.parameters:
        m.parameters = m.weight_elements
        m.notes.append("parameters = all weight values (none is a parameter of the model its spec names)")
    m.models = len(models) or 1
    m.model_labels = [label for label, _ in models]
    if any(k in ckpt for k in TRAINING_STATE_KEYS):
        m.notes.append("training state (optimizer, scheduler, RNG) is not part of the model and not counted")
    return m


# --------------------------------------------------------------------------- graphs: how a value is used


class _Uses:
    """Who reads each value of a graph, and which values are read only as bookkeeping.

    `nodes`: (output names, [(slot, input name)]) in topological order; `outputs`: the graph's
    outputs (data); `is_index(node, slot)`: whether that input of that node is read as a shape,
    axes, counts or indices. A value is index-only when every use is such an input, or feeds a
    node whose outputs are all index-only themselves (shape arithmetic: a Concat of shape pieces).
    """

    def __init__(self, nodes, outputs, is_index):
        self.readers = defaultdict(list)
        for i, (_, inputs) in enumerate(nodes):
            for slot, name in inputs:
                self.readers[name].append((i, slot))
        self.outputs, self.is_index = set(outputs), is_index
        self.passes = [False] * len(nodes)
        for i in reversed(range(len(nodes))):  # in topological order a node's readers come after it
            self.passes[i] = bool(nodes[i][0]) and all(self.index_only(o) for o in nodes[i][0])

    def reads_as_index(self, i: int, slot) -> bool:
        """Node `i` reads its input `slot` as bookkeeping: an index input, or its results are."""
        return self.is_index(i, slot) or self.passes[i]

    def index_only(self, name: str) -> bool:
        uses = self.readers.get(name, [])
        return name not in self.outputs and bool(uses) and all(self.reads_as_index(i, s) for i, s in uses)

    def bookkeeping_use(self, name: str, elements: int) -> bool:
        """Read only as bookkeeping; or never read and one value (a left-over counter)."""
        unread = name not in self.outputs and not self.readers.get(name)
        return self.index_only(name) or (unread and elements <= 1)


# --------------------------------------------------------------------------- ONNX

_ONNX_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# Inputs read as a shape, axes, counts or indices (op type -> input positions); any other input
# (Cast, MatMul, Conv, Mul, Add, Where's condition, OneHot's indices, ...) reads numbers.
ONNX_INDEX_INPUTS = {
    "Reshape": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Expand": (1,), "Tile": (1,), "Split": (1,),
    "Slice": (1, 2, 3, 4), "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,), "ConstantOfShape": (0,),
    "TopK": (1,), "Range": (0, 1, 2), "CumSum": (1,), "Trilu": (1,), "CenterCropPad": (1,),
    "Shape": (0,), "Size": (0,), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,),
    "ScatterElements": (1,), "ScatterND": (1,), **{op: (1,) for op in _ONNX_REDUCE},
}
# Ops that pick values of their first input by index: picking from constants is a codebook
# (quantized weights), so the indices are bookkeeping only where that input comes from the model's input.
ONNX_LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND"})

_ONNX_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "BFLOAT16": "bfloat16"}


def _onnx_dtype_name(data_type: int) -> str:
    from onnx import TensorProto

    name = TensorProto.DataType.Name(data_type)
    return _ONNX_DTYPES.get(name, name.lower())


def _onnx_subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _onnx_names_used(node) -> list[str]:
    """The values a node reads: its inputs, then the outer-scope names its subgraphs read."""
    used = list(node.input)
    for g in _onnx_subgraphs(node):
        for n in g.node:
            used += _onnx_names_used(n)
    return used


def _onnx_uses(nodes, inputs, outputs) -> _Uses:
    """How each value of a graph or function body is used (see `_Uses`); `inputs`: its inputs."""
    live = set(inputs)  # values computed from the model's input
    entries = []
    for node in nodes:
        reads = [(k if k < len(node.input) else "subgraph", name)
                 for k, name in enumerate(_onnx_names_used(node)) if name]
        entries.append((list(node.output), reads))
        if any(name in live for _, name in reads):
            live.update(node.output)

    def is_index(i, slot) -> bool:
        node = nodes[i]
        if slot not in ONNX_INDEX_INPUTS.get(node.op_type, ()):
            return False
        return node.op_type not in ONNX_LOOKUPS or node.input[0] in live

    return _Uses(entries, outputs, is_index)


def _onnx_graph_uses(graph) -> _Uses:
    constants = {t.name for t in graph.initializer} | {st.values.name for st in graph.sparse_initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    return _onnx_uses(graph.node, inputs, [o.name for o in graph.output])


def _onnx_initializers(graph, uses: _Uses):
    """(tensor, where, bookkeeping use) for a graph's initializers and sparse initializers."""
    for t in graph.initializer:
        yield t, "initializer", uses.bookkeeping_use(t.name, math.prod(t.dims))
    for st in graph.sparse_initializer:
        yield st.values, "sparse initializer", uses.bookkeeping_use(st.values.name, math.prod(st.values.dims))


def _onnx_graph_tensors(graph):
    """(tensor, where, bookkeeping use) for initializers, sparse initializers and node attribute
    tensors, recursively."""
    uses = _onnx_graph_uses(graph)
    yield from _onnx_initializers(graph, uses)
    yield from _onnx_node_tensors(graph.node, uses)


def _onnx_attribute_tensors(node, a):
    from onnx import AttributeProto, TensorProto, helper

    if node.op_type == "Constant" and a.name in ("value_float", "value_floats", "value_int", "value_ints"):
        # plain-number Constants are tensors too (a float list can hold weights)
        floats = a.name.startswith("value_float")
        vals = list(a.floats or [a.f]) if floats else list(a.ints or [a.i])
        yield helper.make_tensor(node.output[0], TensorProto.FLOAT if floats else TensorProto.INT64,
                                 [len(vals)], vals)
    elif a.type == AttributeProto.TENSOR:
        yield a.t
    elif a.type == AttributeProto.TENSORS:
        yield from a.tensors
    elif a.type == AttributeProto.SPARSE_TENSOR:
        yield a.sparse_tensor.values


def _onnx_node_tensors(nodes, uses: _Uses):
    """(tensor, where, bookkeeping use) for tensors in node attributes, subgraphs included. A
    Constant's value is used as its output is; another op's tensor attribute (ConstantOfShape's
    fill value) is bookkeeping when it is one number."""
    for node in nodes:
        for a in node.attribute:
            for t in _onnx_attribute_tensors(node, a):
                n = math.prod(t.dims)
                use = uses.bookkeeping_use(node.output[0], n) if node.op_type == "Constant" else n <= 1
                yield t, f"{node.op_type} attribute", use
        for g in _onnx_subgraphs(node):
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


def _onnx_is_weight(t, bookkeeping_use: bool) -> bool:
    return not is_bookkeeping(_onnx_dtype_name(t.data_type), math.prod(t.dims), bookkeeping_use)


def _onnx_models(graph) -> int:
    """Disconnected networks in the top graph that each read a graph input and hold weights.

    Nodes are joined through the values one produces and another reads, and through weights
    they share; graph inputs do not join them (two networks may read the same image).
    """
    uses = _onnx_graph_uses(graph)
    weights = {t.name for t, _, use in _onnx_initializers(graph, uses) if _onnx_is_weight(t, use)}
    init = {t.name for t in graph.initializer} | {st.values.name for st in graph.sparse_initializer}
    inputs = {i.name for i in graph.input} - init
    parent = list(range(len(graph.node)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer, weight_user, reads_input, holds_weights = {}, {}, set(), set()
    for i, node in enumerate(graph.node):
        for o in node.output:
            producer[o] = i
        own = _onnx_node_tensors([node], uses)  # Constant values, subgraph weights
        if any(_onnx_is_weight(t, use) for t, _, use in own):
            holds_weights.add(i)
    for i, node in enumerate(graph.node):
        for name in _onnx_names_used(node):
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
        tensors += list(_onnx_node_tensors(f.node, _onnx_uses(f.node, f.input, f.output)))
    for t, where, use in tensors:
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
            m.add(dtype, n, length, _np_nonzero(raw, np_dtype), use)
        else:
            try:
                arr = numpy_helper.to_array(t)
                nonzero = bool(np.any(arr != 0)) if arr.dtype.kind != "O" else bool(arr.size)
                stored = len(t.raw_data) or arr.nbytes
            except Exception:  # exotic dtypes numpy cannot hold: look at the raw bytes
                nonzero, stored = any(t.raw_data), len(t.raw_data)
            m.add(dtype, n, stored, nonzero, use)
    m.files = [str(f) for f in files]
    m.disk_bytes = sum(files.values())
    m.parameters = m.weight_elements
    m.models = max(1, _onnx_models(model.graph))
    if m.models > 1:
        m.model_labels = [f"{m.models} disconnected networks"]
    return m


# --------------------------------------------------------------------------- Core ML

_NP_BY_NAME = {"float16": np.float16, "float32": np.float32}
# MIL op inputs (by name, for every op) read as a shape, axes, counts, indices or flags; any other
# input (x, y, weight, bias, values, gamma, mean, cond, ...) reads numbers. `indices` are
# bookkeeping only where they pick from values computed from the model's input (see ONNX_LOOKUPS).
MIL_INDEX_INPUTS = frozenset({
    "align_corners", "ascending", "axes", "axis", "batch_axis", "batch_dims", "begin", "begin_mask", "begins",
    "block_shape", "block_size", "box_indices", "ceil_mode", "crop_height", "crop_width", "crops", "dilations",
    "downscale_factor", "elem_shape", "end", "end_mask", "end_masks", "ends", "exclude_padding_from_average",
    "exclusive", "groups", "half_pixel_centers", "index", "indices", "init_length", "interleave", "k",
    "keep_dims", "kernel_sizes", "lengths", "max_boxes", "normalized_coordinates", "num_splits",
    "output_height", "output_sequence", "output_shape", "output_width", "pad", "paddings",
    "per_class_suppression", "perm", "reps", "reset_after", "resized_dims", "return_indices", "reverse",
    "seq_axis", "shape", "size", "sort", "split_sizes", "squeeze_mask", "start", "step", "stride", "strides",
    "target_height", "target_size_height", "target_size_width", "target_width", "transpose_x", "transpose_y",
    "upscale_factor", "validate_indices", "vector_axis"})


def _coreml_proto():
    try:
        import_coremltools()
        from coremltools.proto import MIL_pb2, Model_pb2
    except ImportError:
        raise UsageError("measuring a Core ML model needs coremltools", example="pip install 'flm[export]'") from None
    return Model_pb2, MIL_pb2


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
        refs: list[tuple[str, int, str, bool]] = []  # (file, offset, declared dtype, bookkeeping use)

        def weight_refs():
            return sum(not is_bookkeeping(dtype, 0, use) for *_, dtype, use in refs)

        for fname in sorted(prog.functions):
            before = (self.m.weight_tensors, weight_refs())
            self.function(prog.functions[fname], refs)
            with_weights += (self.m.weight_tensors, weight_refs()) != before
        bookkeeping = {}  # (weight file, offset) -> every reference reads it as bookkeeping
        for file, offset, _, use in refs:
            key = (self.weight_file(model_dir, file), offset)
            bookkeeping[key] = bookkeeping.get(key, True) and use
        for file in sorted({f for f, *_ in refs}):
            path = self.weight_file(model_dir, file)
            if path not in self.blob_files:
                self.blob_files[path] = read_blob_file(path, self.model_path)
                for offset, (dtype, n, raw) in self.blob_files[path].items():  # every blob, referenced or not
                    np_dtype = _NP_BY_NAME.get(dtype)
                    nonzero = bool(np.any(np.frombuffer(raw, np_dtype) != 0)) if np_dtype else any(raw)
                    self.m.add(dtype, n, len(raw), nonzero, bookkeeping.get((path, offset), False))
        for file, offset, declared, _ in refs:
            blob_at(self.blob_files[self.weight_file(model_dir, file)], offset, declared, file, self.model_path)
        return with_weights

    def function(self, fn, refs) -> None:
        for block in fn.block_specializations.values():
            ops, uses = _mil_uses(fn, block)
            for i, op in enumerate(ops):
                for key, value in op.attributes.items():
                    self.value(value, refs, _mil_attribute_use(op, key, value, uses))
                for param, arg in op.inputs.items():
                    for binding in arg.arguments:
                        if binding.WhichOneof("binding") == "value":
                            self.value(binding.value, refs, uses.reads_as_index(i, param))

    def value(self, v, refs, bookkeeping_use: bool) -> None:
        """Add a tensor value; `bookkeeping_use`: it is read only as bookkeeping."""
        if v.type.WhichOneof("type") != "tensorType":
            return
        tt = v.type.tensorType
        dtype = self.MIL_pb2.DataType.Name(tt.dataType).lower()
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            refs.append((v.blobFileValue.fileName, int(v.blobFileValue.offset), dtype, bookkeeping_use))
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
        self.m.add(dtype, n, stored, nonzero, bookkeeping_use)

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


def _mil_ops(block):
    """Every op of a block, each nested block's ops right after the op that holds them."""
    for op in block.operations:
        yield op
        for sub in op.blocks:
            yield from _mil_ops(sub)


def _mil_uses(fn, block) -> tuple[list, _Uses]:
    """A MIL function's ops (flattened) and how each value is used (see `_Uses`)."""
    ops = list(_mil_ops(block))
    live = {i.name for i in fn.inputs}  # values computed from the model's input
    entries = []
    for op in ops:
        reads = [(param, b.name) for param, arg in op.inputs.items() for b in arg.arguments
                 if b.WhichOneof("binding") == "name"]
        entries.append(([o.name for o in op.outputs], reads))
        if any(name in live for _, name in reads):
            live.update(o.name for o in op.outputs)
    outputs = list(block.outputs) + [name for op in ops for sub in op.blocks for name in sub.outputs]

    def is_index(i, param) -> bool:
        if param != "indices":
            return param in MIL_INDEX_INPUTS
        args = ops[i].inputs  # indices pick from `x` (gather) or `data` (scatter); one_hot has neither
        source = next((args[k] for k in ("x", "data") if k in args), None)
        return source is not None and any(b.WhichOneof("binding") == "name" and b.name in live
                                          for b in source.arguments)

    return ops, _Uses(entries, outputs, is_index)


def _mil_attribute_use(op, key: str, value, uses: _Uses) -> bool:
    """A const's value is read as its output is; another op's attribute (its name, a constexpr
    axis) is bookkeeping when it is one value."""
    n = math.prod(d.constant.size for d in value.type.tensorType.dimensions)  # a constant's dims are fixed
    if op.type == "const" and key == "val":
        return uses.bookkeeping_use(op.outputs[0].name, n)
    return n <= 1


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
