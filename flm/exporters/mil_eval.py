"""A reference evaluator for Core ML ML programs, in numpy, for checking exports off macOS.

It reads a saved `.mlpackage` from disk — the program from `Data/com.apple.CoreML/model.mlmodel`
(protobuf, `coremltools.proto.Model_pb2`, through `flm.exporters.mlpackage`) and the weights from
the package's `weights/*.bin` (parsed by `flm.coreml_io.read_blob_file`, the parser check-budget
uses too) — and runs the program's `main` function op by op.

- It implements exactly the ops flm's presets produce (plus a few close relatives, each with
  MIL's documented semantics). An op it does not know is an error (`UnsupportedOp`), raised
  when the program is loaded, never skipped.
- Arithmetic is float32; every result is stored in the dtype the program declares for it, so a
  float16 program runs as stored (fp16 weights, fp16 activations) and fails a float32 parity
  check, as it would on a device.
- Every result's shape is checked against the shape the converter declared for it: a mismatch
  means this evaluator and coremltools disagree on an op's meaning, and is an error too.
- An input with a flexible batch axis takes only the batch sizes the package declares
  (`flm.exporters.mlpackage.declared_batch_range`); any other batch is refused, as Core ML does.

This module needs coremltools (for the protobuf classes), never torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flm.coreml_io import blob_at, read_blob_file
from flm.errors import FlmError, ModelFileError
from flm.exporters.mlpackage import MODEL_FILE, declared_batch_range, read_package


class MilEvalError(FlmError):
    """The reference evaluator cannot run this program as written."""


class UnsupportedOp(MilEvalError):
    """The program uses an op the reference evaluator does not implement."""

    def __init__(self, path, ops: list[str]):
        self.ops = ops
        super().__init__(f"{path}: the reference MIL evaluator does not implement op(s) {', '.join(ops)}; "
                         f"it refuses to skip them, so this file cannot be verified off macOS")


# --------------------------------------------------------------------------- values and dtypes

_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "INT8": np.int8,
           "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16,
           "UINT32": np.uint32, "BOOL": np.bool_, "STRING": np.str_}
_BLOB_DTYPES = ("float16", "float32", "int8", "int16", "int32", "uint8", "uint16", "uint32")  # weights it reads
_CAST = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
         "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}


def _dtype(type_proto, where):
    from coremltools.proto import MIL_pb2

    if type_proto.WhichOneof("type") != "tensorType":
        raise MilEvalError(f"{where}: value type {type_proto.WhichOneof('type')!r} is not supported")
    name = MIL_pb2.DataType.Name(type_proto.tensorType.dataType)
    if name not in _DTYPES:
        raise MilEvalError(f"{where}: dtype {name} is not supported by the reference evaluator")
    return _DTYPES[name]


def _declared_shape(type_proto) -> tuple:
    """Dims the program declares; None where a dim is flexible (the batch)."""
    dims = type_proto.tensorType.dimensions
    return tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in dims)


class MilProgram:
    """The `main` function of a saved ML program, ready to run on numpy inputs."""

    def __init__(self, package, model_proto=None):
        self.path = Path(package)
        proto = model_proto if model_proto is not None else read_package(self.path)
        self.weights_dir = self.path / MODEL_FILE.parent / "weights"
        self._blob_files: dict[Path, dict] = {}  # weight file -> its blobs, each file read once
        functions = proto.mlProgram.functions
        if "main" not in functions:
            raise ModelFileError(self.path, f"ML program has no 'main' function (has {list(functions)})")
        fn = functions["main"]
        if fn.opset not in fn.block_specializations:
            raise ModelFileError(self.path, f"ML program lacks the block for its opset {fn.opset!r}")
        block = fn.block_specializations[fn.opset]
        self.opset = fn.opset
        self.inputs = {nv.name: (_dtype(nv.type, nv.name), _declared_shape(nv.type)) for nv in fn.inputs}
        self.batch_ranges = {name: declared_batch_range(proto, self.path, name)
                             for name, (_, shape) in self.inputs.items() if shape and shape[0] is None}
        self.outputs = list(block.outputs)
        self.consts: dict[str, np.ndarray] = {}
        self.ops: list[tuple] = []
        unknown = sorted({op.type for op in block.operations if op.type != "const" and op.type not in OPS})
        if unknown:
            raise UnsupportedOp(self.path, unknown)
        for op in block.operations:
            where = f"{self.path}: op {op.type} -> {[o.name for o in op.outputs]}"
            if op.blocks:
                raise MilEvalError(f"{where}: nested blocks (control flow) are not supported")
            if op.type == "const":
                if "val" not in op.attributes or len(op.outputs) != 1:
                    raise ModelFileError(self.path, f"{where}: malformed const")
                self.consts[op.outputs[0].name] = self._value(op.attributes["val"], where)
                continue
            args = {}
            for param, argument in op.inputs.items():
                bound = []
                for b in argument.arguments:
                    kind = b.WhichOneof("binding")
                    if kind == "name":
                        bound.append(("name", b.name))
                    elif kind == "value":
                        bound.append(("value", self._value(b.value, where)))
                    else:
                        raise MilEvalError(f"{where}: binding {kind!r} is not supported")
                args[param] = bound
            outs = [(o.name, _dtype(o.type, where), _declared_shape(o.type)) for o in op.outputs]
            self.ops.append((op.type, args, outs, where))

    # ----------------------------------------------------------------------- weights

    def _value(self, value, where):
        dtype = _dtype(value.type, where)
        shape = _declared_shape(value.type)
        if None in shape:
            raise MilEvalError(f"{where}: a constant with a flexible shape")
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            imm = value.immediateValue
            if imm.WhichOneof("value") != "tensor":
                raise MilEvalError(f"{where}: immediate {imm.WhichOneof('value')!r} values are not supported")
            tensor = imm.tensor
            field = tensor.WhichOneof("value")
            if field == "strings":
                vals = list(tensor.strings.values)
                return vals[0] if shape == () else np.array(vals).reshape(shape)
            if field == "bytes":
                arr = np.frombuffer(tensor.bytes.values, dtype)
            else:
                arr = np.array(list(getattr(tensor, field).values)).astype(dtype)
            return arr.reshape(shape)
        if kind == "blobFileValue":
            blob = value.blobFileValue
            return self._read_blob(blob.fileName, blob.offset, dtype, where).reshape(shape)
        raise MilEvalError(f"{where}: value kind {kind!r} is not supported")

    def _read_blob(self, file_name: str, offset: int, dtype, where) -> np.ndarray:
        path = self.weights_dir / Path(file_name).name
        if not path.is_file():
            raise ModelFileError(self.path, f"weight file {path.name} is missing (referenced by {where})")
        if path not in self._blob_files:
            self._blob_files[path] = read_blob_file(path, self.path)
        stored, _, data = blob_at(self._blob_files[path], offset, np.dtype(dtype).name, file_name, self.path)
        if stored not in _BLOB_DTYPES:
            raise MilEvalError(f"{where}: weights of dtype {stored} are not supported")
        return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)

    # ----------------------------------------------------------------------- running

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `main` on `feeds` (name -> array); returns every program output as float32."""
        env: dict[str, object] = dict(self.consts)
        for name, (dtype, shape) in self.inputs.items():
            if name not in feeds:
                raise MilEvalError(f"{self.path}: input {name!r} not given")
            x = np.asarray(feeds[name])
            if x.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, x.shape)):
                raise MilEvalError(f"{self.path}: input {name!r} has shape {x.shape}, the program takes "
                                   f"{tuple('?' if d is None else d for d in shape)}")
            self._check_batch(name, x)
            env[name] = x.astype(dtype)
        for op_type, args, outs, where in self.ops:
            inputs = {p: [env[v] if kind == "name" else v for kind, v in bound] for p, bound in args.items()}
            try:
                result = OPS[op_type](_Args(inputs, where))
            except (ValueError, IndexError, KeyError) as e:
                raise MilEvalError(f"{where}: {type(e).__name__}: {e}") from None
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(outs):
                raise MilEvalError(f"{where}: produced {len(results)} values for {len(outs)} outputs")
            for value, (name, dtype, shape) in zip(results, outs):
                value = np.asarray(value).astype(dtype)  # stored as declared: fp16 programs stay fp16
                if value.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, value.shape)):
                    raise MilEvalError(f"{where}: result {name!r} has shape {value.shape} but the program "
                                       f"declares {tuple('?' if d is None else d for d in shape)}")
                env[name] = value
        return {name: np.asarray(env[name], np.float32) for name in self.outputs}

    def _check_batch(self, name: str, x: np.ndarray) -> None:
        if name not in self.batch_ranges:
            return
        lo, hi = self.batch_ranges[name]
        if x.shape[0] < lo or (hi is not None and x.shape[0] > hi):
            raise MilEvalError(f"{self.path}: input {name!r} has batch {x.shape[0]}, but the package declares "
                               f"batch {lo}..{'any' if hi is None else hi}; Core ML refuses other batches, "
                               "and so does this evaluator")


class _Args:
    """An op's inputs, with MIL defaults; float16 tensors are widened to float32 for arithmetic."""

    def __init__(self, inputs: dict, where: str):
        self.inputs, self.where = inputs, where

    def has(self, name) -> bool:
        return name in self.inputs

    def raw(self, name, default=None):
        if name not in self.inputs:
            if default is None:
                raise MilEvalError(f"{self.where}: missing input {name!r}")
            return default
        vals = self.inputs[name]
        return vals[0] if len(vals) == 1 else vals

    def tensor(self, name, default=None) -> np.ndarray:
        v = np.asarray(self.raw(name, default))
        return v.astype(np.float32) if v.dtype == np.float16 else v

    def tensors(self, name) -> list[np.ndarray]:
        out = []
        for v in self.inputs[name]:
            v = np.asarray(v)
            out.append(v.astype(np.float32) if v.dtype == np.float16 else v)
        return out

    def int(self, name, default=None) -> int:
        return int(np.asarray(self.raw(name, default)).item())

    def ints(self, name, default=None) -> list[int]:
        return [int(v) for v in np.asarray(self.raw(name, default)).reshape(-1)]

    def bool(self, name, default=False) -> bool:
        return bool(np.asarray(self.raw(name, default)).item()) if name in self.inputs else default

    def str(self, name, default=None) -> str:
        v = self.raw(name, default)
        return v if isinstance(v, str) else str(np.asarray(v).item())


# --------------------------------------------------------------------------- ops

OPS: dict = {}


def op(*names):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


@op("relu")
def _relu(a):
    x = a.tensor("x")
    return np.maximum(x, np.zeros((), x.dtype))


def _make_binary(fn):
    return lambda a: fn(a.tensor("x"), a.tensor("y"))  # numpy broadcasting == MIL's


OPS.update({"add": _make_binary(np.add), "sub": _make_binary(np.subtract),
            "mul": _make_binary(np.multiply), "real_div": _make_binary(np.divide)})


@op("cast")
def _cast(a):
    dtype = a.str("dtype")
    if dtype not in _CAST:
        raise MilEvalError(f"{a.where}: cast to {dtype!r} is not supported")
    return np.asarray(a.raw("x")).astype(_CAST[dtype])


def _spatial_pads(a, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, following MIL's pad_type rules."""
    pad_type = a.str("pad_type", "valid")
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = a.ints("pad", [0] * 2 * n)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i, k, s, d in zip(in_sizes, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max(0, s * math.ceil(i / s) - i + eff - s)
            small = total // 2
            pads.append((small, total - small) if pad_type == "same" else (total - small, small))
        return pads
    raise MilEvalError(f"{a.where}: pad_type {pad_type!r} is not supported")


def _windows(xp, kernel, strides, dilations, out_sizes):
    """Yield ((i, j), view) for every kernel offset: view[..., y, x] = xp[..., y*s + i*d, x*s + j*d]."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, strides, dilations, out_sizes
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            yield (i, j), xp[..., y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]


@op("conv")
def _conv(a):
    x, w = a.tensor("x"), a.tensor("weight")
    if x.ndim != 4:
        raise MilEvalError(f"{a.where}: only 2-D convolution is supported (x has rank {x.ndim})")
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    groups = a.int("groups", 1)
    strides, dil = a.ints("strides", [1, 1]), a.ints("dilations", [1, 1])
    if c != cg * groups:
        raise MilEvalError(f"{a.where}: {c} input channels do not match weight {w.shape} with {groups} groups")
    pads = _spatial_pads(a, (h, wd), (kh, kw), strides, dil)
    xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    ho = (h + sum(pads[0]) - (kh - 1) * dil[0] - 1) // strides[0] + 1
    wo = (wd + sum(pads[1]) - (kw - 1) * dil[1] - 1) // strides[1] + 1
    # im2col: cols[n, g, cg, kh, kw, ho*wo] then one matmul per group (BLAS, float32)
    cols = np.empty((n, c, kh, kw, ho, wo), np.float32)
    for (i, j), view in _windows(xp, (kh, kw), strides, dil, (ho, wo)):
        cols[:, :, i, j] = view
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    wm = w.reshape(groups, o // groups, cg * kh * kw)
    if cg == 1 and o == groups:  # depthwise: a weighted sum per channel
        out = np.einsum("ngkl,gk->ngl", cols, wm[:, 0, :], optimize=False).reshape(n, o, ho, wo)
    else:
        out = np.matmul(wm[None], cols).reshape(n, o, ho, wo)
    if a.has("bias"):
        out = out + a.tensor("bias").reshape(1, -1, 1, 1)
    return out


@op("conv_transpose")
def _conv_transpose(a):
    x, w = a.tensor("x"), a.tensor("weight")  # weight: [C_in, C_out / groups, kH, kW]
    if x.ndim != 4:
        raise MilEvalError(f"{a.where}: only 2-D transposed convolution is supported")
    n, cin, h, wd = x.shape
    _, og, kh, kw = w.shape
    groups = a.int("groups", 1)
    (sh, sw), (dh, dw) = a.ints("strides", [1, 1]), a.ints("dilations", [1, 1])
    cout, cg = og * groups, cin // groups
    full_h, full_w = (h - 1) * sh + (kh - 1) * dh + 1, (wd - 1) * sw + (kw - 1) * dw + 1
    full = np.zeros((n, cout, full_h, full_w), np.float32)
    xg = x.reshape(n, groups, cg, h * wd)
    wg = w.reshape(groups, cg, og, kh, kw)
    for i in range(kh):
        for j in range(kw):
            # contribution of kernel tap (i, j): out[n, g, o, :] = sum_c w[g, c, o, i, j] * x[n, g, c, :]
            contrib = np.matmul(np.swapaxes(wg[:, :, :, i, j], 1, 2)[None], xg).reshape(n, cout, h, wd)
            full[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += contrib
    pad_type = a.str("pad_type", "valid")
    if pad_type == "custom":
        p = a.ints("pad", [0, 0, 0, 0])
        crops = [(p[0], p[1]), (p[2], p[3])]
    elif pad_type == "valid":
        crops = [(0, 0), (0, 0)]
    elif pad_type == "same":
        crops = []
        for f, i, s in ((full_h, h, sh), (full_w, wd, sw)):
            total = max(0, f - i * s)
            crops.append((total // 2, total - total // 2))
    else:
        raise MilEvalError(f"{a.where}: pad_type {pad_type!r} is not supported")
    out = full[:, :, crops[0][0]:full_h - crops[0][1], crops[1][0]:full_w - crops[1][1]]
    if a.has("output_shape"):
        want = a.ints("output_shape")[2:]
        pad_end = [(0, max(0, t - s)) for t, s in zip(want, out.shape[2:])]
        out = np.pad(out, ((0, 0), (0, 0), *pad_end))[:, :, :want[0], :want[1]]
    if a.has("bias"):
        out = out + a.tensor("bias").reshape(1, -1, 1, 1)
    return out


def _pool(a, kind):
    x = a.tensor("x")
    if x.ndim != 4:
        raise MilEvalError(f"{a.where}: only 2-D pooling is supported")
    n, c, h, wd = x.shape
    k = a.ints("kernel_sizes")
    strides = a.ints("strides", [1, 1])
    pads = _spatial_pads(a, (h, wd), k, strides, (1, 1))
    ceil = a.bool("ceil_mode", False)
    outs = []
    for size, (pb, pa), kk, s in zip((h, wd), pads, k, strides):
        if not ceil:
            outs.append((size + pb + pa - kk) // s + 1)
        else:  # MIL's rule (spatial_dimensions_out_shape)
            o = (size + pb + pa - kk + s - 1) // s + 1
            if (o - 1) * s >= size + (pb + pa) / 2 and pb + pa > 0:
                o -= 1
            outs.append(o)
    # extend the far side so every window exists (ceil mode); padded cells never win / never count
    extra = [max(0, (o - 1) * s + kk - (size + pb + pa)) for o, s, kk, size, (pb, pa)
             in zip(outs, strides, k, (h, wd), pads)]
    pad_spec = ((0, 0), (0, 0), (pads[0][0], pads[0][1] + extra[0]), (pads[1][0], pads[1][1] + extra[1]))
    if kind == "max":
        xp = np.pad(x, pad_spec, constant_values=-np.inf)
        out = None
        for _, view in _windows(xp, k, strides, (1, 1), outs):
            out = view.copy() if out is None else np.maximum(out, view)
        return out
    xp = np.pad(x, pad_spec)
    total = np.zeros((n, c, *outs), np.float32)
    for _, view in _windows(xp, k, strides, (1, 1), outs):
        total += view
    if a.bool("exclude_padding_from_average", False):
        ones = np.pad(np.ones((1, 1, h, wd), np.float32), pad_spec)
        count = np.zeros((1, 1, *outs), np.float32)
        for _, view in _windows(ones, k, strides, (1, 1), outs):
            count += view
        return total / count
    return total / np.float32(k[0] * k[1])


OPS["max_pool"] = lambda a: _pool(a, "max")
OPS["avg_pool"] = lambda a: _pool(a, "avg")


def _axes(a, x):
    if not a.has("axes"):
        return None
    return tuple(int(ax) % x.ndim for ax in a.ints("axes"))


def _reduce(fn):
    def run(a):
        x = a.tensor("x")
        return fn(x, axis=_axes(a, x), keepdims=a.bool("keep_dims", False))
    return run


OPS["reduce_sum"] = _reduce(lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float32))
OPS["reduce_mean"] = _reduce(lambda x, axis, keepdims: np.mean(x, axis=axis, keepdims=keepdims, dtype=np.float32))
OPS["reduce_max"] = _reduce(np.max)


@op("softmax")
def _softmax(a):
    x = a.tensor("x")
    axis = a.int("axis", -1)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True, dtype=np.float32)


@op("reshape")
def _reshape(a):
    x = np.asarray(a.raw("x"))
    shape = a.ints("shape")
    if len(shape) == x.ndim:  # 0 copies the input's dim (only when the ranks agree)
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("transpose")
def _transpose(a):
    return np.transpose(np.asarray(a.raw("x")), a.ints("perm"))


@op("concat")
def _concat(a):
    values = a.tensors("values")
    axis = a.int("axis") % values[0].ndim
    if a.bool("interleave", False):
        # out[..., i*V + v, ...] = values[v][..., i, ...]  (all inputs have the same shape)
        if any(v.shape != values[0].shape for v in values):
            raise MilEvalError(f"{a.where}: interleaved concat needs equal shapes, got {[v.shape for v in values]}")
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@op("split")
def _split(a):
    x = np.asarray(a.raw("x"))
    axis = a.int("axis") % x.ndim
    if a.has("split_sizes"):
        sizes = a.ints("split_sizes")
    elif a.has("num_splits"):
        k = a.int("num_splits")
        if x.shape[axis] % k:
            raise MilEvalError(f"{a.where}: cannot split {x.shape[axis]} into {k} equal parts")
        sizes = [x.shape[axis] // k] * k
    else:
        raise MilEvalError(f"{a.where}: split needs split_sizes or num_splits")
    if sum(sizes) != x.shape[axis]:
        raise MilEvalError(f"{a.where}: split sizes {sizes} do not add up to {x.shape[axis]}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@op("stack")
def _stack(a):
    return np.stack(a.tensors("values"), axis=a.int("axis"))


@op("linear")
def _linear(a):
    x, w = a.tensor("x"), a.tensor("weight")  # weight: [out, in]
    y = np.matmul(x, w.T)
    return y + a.tensor("bias") if a.has("bias") else y


@op("matmul")
def _matmul(a):
    x, y = a.tensor("x"), a.tensor("y")
    if a.bool("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.bool("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("batch_norm")
def _batch_norm(a):
    x = a.tensor("x")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = a.tensor("mean").reshape(shape), a.tensor("variance").reshape(shape)
    y = (x - mean) / np.sqrt(var + np.float32(a.tensor("epsilon", np.float32(1e-5))))
    if a.has("gamma"):
        y = y * a.tensor("gamma").reshape(shape)
    if a.has("beta"):
        y = y + a.tensor("beta").reshape(shape)
    return y


@op("expand_dims")
def _expand_dims(a):
    x = np.asarray(a.raw("x"))
    out_rank = x.ndim + len(a.ints("axes"))
    return np.expand_dims(x, tuple(ax % out_rank for ax in a.ints("axes")))


@op("squeeze")
def _squeeze(a):
    x = np.asarray(a.raw("x"))
    axes = _axes(a, x)
    return np.squeeze(x, axis=axes)


@op("slice_by_index")
def _slice_by_index(a):
    x = np.asarray(a.raw("x"))
    r = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * r) if a.has("stride") else [1] * r
    bmask = a.ints("begin_mask") if a.has("begin_mask") else [0] * r
    emask = a.ints("end_mask") if a.has("end_mask") else [0] * r
    smask = a.ints("squeeze_mask") if a.has("squeeze_mask") else [0] * r
    index = []
    for i in range(r):
        b = None if bmask[i] else begin[i]
        e = None if emask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    out = x[tuple(index)]
    squeeze = tuple(i for i in range(r) if smask[i])
    return np.squeeze(out, axis=squeeze) if squeeze else out
