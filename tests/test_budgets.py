"""Budgets: every rule of challenge-15mb can fail, on every artefact kind, and passes when it should.

Fixtures are made here: flm checkpoints of real presets (and doctored copies), ONNX graphs built
with onnx.helper, and Core ML packages converted with coremltools from a tiny traced model.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flm.budgets import DEFAULT_BUDGET, MB, enforce, evaluate, get_budget, load_budgets, preset_fits
from flm.budgets.measure import measure, measure_checkpoint, measure_coreml, measure_onnx, measure_preset
from flm.cli import main
from flm.errors import BudgetExceeded, FlmError, ModelFileError, UsageError
from flm.fileio import size_of
from flm.pipeline.checkpoint import save_checkpoint
from flm.pipeline.models import build_model

from tests.helpers.checkpoints import payload
from tests.helpers.cli import flm


def verdict(m, budget=DEFAULT_BUDGET) -> dict[str, bool]:
    return {r.rule: r.passed for r in evaluate(m, budget)}


ALL_PASS = {"size": True, "dtypes": True, "models": True, "weights": True}


# --------------------------------------------------------------------------- the table


def test_budget_table_states_limits_in_bytes():
    ch, mob = get_budget("challenge-15mb"), get_budget("mobile-5mb")
    assert ch.max_bytes == 15_000_000 and mob.max_bytes == 5_000_000 and MB == 10 ** 6
    for b in (ch, mob):
        assert b.allowed_dtypes == ("float32",) and b.max_models == 1 and b.require_weights
    with pytest.raises(UsageError, match="unknown budget 'nope'.*challenge-15mb"):
        get_budget("nope")


def test_budget_table_rejects_bad_entries(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('[x]\nmax_bytes = "15MB"\n')
    with pytest.raises(FlmError, match=r"\[x\] max_bytes must be a positive integer"):
        load_budgets(p)
    p.write_text('[x]\nmax_bytes = 10\nmax_model = 1\n')
    with pytest.raises(FlmError, match="unknown key"):
        load_budgets(p)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["shufflenet-heatmap", "resnet-regressor"])
def test_shipping_presets_pass(name):
    m = measure_preset(name)
    assert verdict(m) == ALL_PASS
    assert m.size_basis == "float32" and m.size_bytes == 4 * m.weight_elements < 15_000_000
    enforce(evaluate(m))  # does not raise


def test_resnet18_fails_with_measured_size():
    m = measure_preset("resnet18-regressor")
    assert 44.9e6 < m.size_bytes < 45.1e6  # 11.24 M parameters + BN buffers, 4 bytes each
    assert verdict(m) == {**ALL_PASS, "size": False}
    with pytest.raises(BudgetExceeded) as e:
        enforce(evaluate(m))
    assert e.value.budget == "challenge-15mb" and [f[0] for f in e.value.failures] == ["size"]
    assert f"{m.size_bytes:,} bytes" in str(e.value) and "45.00 MB" in str(e.value)


def test_preset_fits_says_what_would_fit():
    ok, msg = preset_fits("resnet18-regressor")
    assert not ok and "45.00 MB" in msg and "--model resnet-regressor" in msg
    ok, msg = preset_fits("resnet-regressor", width=1.0)
    assert not ok and "--width 0.5 fits" in msg
    ok, msg = preset_fits("shufflenet-heatmap", budget="mobile-5mb")
    assert not ok and "--upsample light fits (3.93 MB" in msg
    ok, msg = preset_fits("shufflenet-heatmap", width=2.0, budget="mobile-5mb")  # light is 14.91 MB
    assert not ok and "--width 0.5 fits" in msg
    ok, msg = preset_fits("simple-cnn", img_size=256)
    assert not ok and "--img-size 96 fits" in msg
    ok, msg = preset_fits("shufflenet-heatmap")
    assert ok and "10.72 MB" in msg
    ok, msg = preset_fits("shufflenet-heatmap", head=[2000, 2000])  # the head counts too
    assert not ok and "--head 2000,2000 needs 322.01 MB" in msg and "with the default head it fits" in msg
    ok, msg = preset_fits("shufflenet-heatmap", width=0.5, head=[128, 96])  # flm-68-fast's network
    assert ok and "3.06 MB" in msg  # one head (the checkpoint holds two: 3.08 MB)
    ok, msg = preset_fits("shufflenet-heatmap", width=1.5)  # 4x4 deconvolutions: over 15 MB ...
    assert not ok and "17.74 MB" in msg and "--upsample light fits (8.18 MB" in msg
    ok, msg = preset_fits("shufflenet-heatmap", width=1.5, upsample="light")  # ... the light head: within
    assert ok and "--width 1.5 --upsample light needs 8.18 MB" in msg


def test_train_counts_the_light_upsamplings_against_the_budget(tmp_path):
    r = flm("train", "--width", "1.5", "--max-steps", "1", "--out", tmp_path / "deconv")
    assert r.returncode == 2 and "--upsample light fits" in r.stderr
    r = flm("train", "--width", "1.5", "--upsample", "light", "--img-size", "64", "--synthetic-n", "16",
            "--batch-size", "8", "--workers", "0", "--max-steps", "1", "--epochs", "1", "--out", tmp_path / "light")
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = build_model("shufflenet-heatmap", 64, {"width": 0.5})
    return model


def test_checkpoint_passes_and_training_state_is_not_a_model(tmp_path, small_model):
    best = save_checkpoint(tmp_path / "best.pt", small_model)
    m = measure_checkpoint(best)
    assert verdict(m) == ALL_PASS
    assert m.parameters == sum(p.numel() for p in small_model.parameters())
    assert m.size_bytes == 4 * sum(t.numel() for t in small_model.state_dict().values() if t.is_floating_point())
    # a last.pt carries optimizer state (2 more tensors per parameter): same model, same size
    opt = torch.optim.AdamW(small_model.parameters())
    for p in small_model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    last = save_checkpoint(tmp_path / "last.pt", small_model, optimizer=opt.state_dict(), torch_rng=torch.get_rng_state())
    m2 = measure_checkpoint(last)
    assert verdict(m2) == ALL_PASS and m2.models == 1
    assert m2.weight_elements == m.weight_elements and m2.disk_bytes > 2 * m.disk_bytes


def test_checkpoint_with_a_float16_tensor_fails(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["out.weight"] = sd["out.weight"].half()
    torch.save(payload(small_model, state_dict=sd), tmp_path / "half.pt")
    m = measure_checkpoint(tmp_path / "half.pt")
    assert verdict(m) == {**ALL_PASS, "dtypes": False}
    assert m.weight_dtypes["float16"].tensors == 1
    with pytest.raises(BudgetExceeded, match="dtypes: not allowed: float16: 1 tensor"):
        enforce(evaluate(m))


def test_int8_quantized_checkpoint_fails(tmp_path, small_model):
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    q = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(payload(small_model, state_dict=q.state_dict()), tmp_path / "q.pt")
    m = measure_checkpoint(tmp_path / "q.pt")
    assert verdict(m)["dtypes"] is False and m.weight_dtypes["qint8"].elements == 64 * 32 + 32 * 8
    # the float32 original of the same network passes the dtype rule: the quantization is what fails
    torch.save(payload(small_model, state_dict=net.state_dict()), tmp_path / "f.pt")
    assert verdict(measure_checkpoint(tmp_path / "f.pt"))["dtypes"] is True


def test_ensemble_checkpoint_fails(tmp_path, small_model):
    other = build_model("shufflenet-heatmap", 64, {"width": 0.5}).state_dict()
    sd = small_model.state_dict()
    torch.save(payload(small_model, state_dict=sd, ensemble=[sd, other]), tmp_path / "e.pt")
    m = measure_checkpoint(tmp_path / "e.pt")
    assert m.models == 2 and m.model_labels == ["state_dict", "ensemble[1]"]
    assert verdict(m) == {**ALL_PASS, "models": False}
    # two state_dicts under separate keys are two models as well
    torch.save(payload(small_model, teacher=other), tmp_path / "t.pt")
    assert measure_checkpoint(tmp_path / "t.pt").models == 2


def another(seed: int, width: float = 0.5) -> dict:
    """The state_dict of another model of the same preset (other random weights)."""
    torch.manual_seed(seed)
    return build_model("shufflenet-heatmap", 64, {"width": width}).state_dict()


@pytest.mark.parametrize("where", ["members", "deep-list", "tuple"])
def test_a_second_model_anywhere_in_a_checkpoint_fails(tmp_path, small_model, where):
    extra = {"members": {"members": {"a": another(1), "b": another(2)}},
             "deep-list": {"history": {"runs": [1, "two", {"weights": [another(1)]}]}},
             "tuple": {"backup": {"old": (another(1),)}}}[where]
    torch.save(payload(small_model, **extra), tmp_path / "m.pt")
    m = measure_checkpoint(tmp_path / "m.pt")
    assert verdict(m) == {**ALL_PASS, "models": False}
    assert m.model_labels == {"members": ["state_dict", "members.a", "members.b"],
                              "deep-list": ["state_dict", "history.runs[2].weights[0]"],
                              "tuple": ["state_dict", "backup.old[0]"]}[where]
    assert main(["check-budget", str(tmp_path / "m.pt")]) == 1


def test_two_copies_under_prefixes_in_one_state_dict_fail(tmp_path, small_model):
    sd = {f"member{i}.{k}": v for i, s in enumerate((another(1), another(2))) for k, v in s.items()}
    torch.save(payload(small_model, state_dict=sd), tmp_path / "p.pt")
    m = measure_checkpoint(tmp_path / "p.pt")
    assert m.models == 1 and verdict(m) == {**ALL_PASS, "models": False}
    assert len(m.unused_weights) == len(sd) and any("missing from its state_dict" in n for n in m.notes)
    with pytest.raises(BudgetExceeded, match=r"models: 1; \d+ tensor\(s\) beside it that the model does not use: "
                                             r"state_dict\['member0\.[^]]+'\].* and \d+ more"):
        enforce(evaluate(m))


def test_weights_beside_the_model_fail_and_are_named(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["spare.weight"] = torch.randn(64, 64)  # capacity the model never reads
    torch.save(payload(small_model, state_dict=sd), tmp_path / "spare.pt")
    m = measure_checkpoint(tmp_path / "spare.pt")
    assert verdict(m) == {**ALL_PASS, "models": False} and m.unused_weights == ["state_dict['spare.weight']"]
    assert "state_dict['spare.weight']" in next(r.measured for r in evaluate(m) if r.rule == "models")
    sd = dict(small_model.state_dict())
    sd["out.weight"] = torch.randn(*sd["out.weight"].shape[:-1], 3, 3)  # a known name, a bigger shape
    torch.save(payload(small_model, state_dict=sd), tmp_path / "grown.pt")
    assert measure_checkpoint(tmp_path / "grown.pt").unused_weights == ["state_dict['out.weight']"]


def test_a_model_hidden_in_training_state_fails(tmp_path, small_model):
    hidden = {"state": {}, "param_groups": [], "members": {"a": another(1, width=1.0)}}
    torch.save(payload(small_model, optimizer=hidden), tmp_path / "o.pt")
    m = measure_checkpoint(tmp_path / "o.pt")
    assert verdict(m) == {**ALL_PASS, "models": False}
    assert all(w.startswith("optimizer.members.a.") for w in m.unused_weights)
    torch.save(payload(small_model, torch_rng=torch.randint(0, 255, (10_000,), dtype=torch.uint8)), tmp_path / "r.pt")
    assert measure_checkpoint(tmp_path / "r.pt").unused_weights == ["torch_rng"]


def test_extra_heads_pass_only_when_the_spec_builds_them(tmp_path, small_model):
    # the model is rebuilt from the checkpoint's own spec: heads its spec asks for are its own
    spec = small_model.spec.with_(conventions=("ibug68", "menpo68"))
    torch.manual_seed(0)
    model = build_model("shufflenet-heatmap", spec=spec, options={"width": 0.5})
    sd = model.state_dict()
    assert len(sd) > len(small_model.state_dict())
    torch.save(payload(small_model, spec=spec.to_json(), state_dict=sd), tmp_path / "heads.pt")
    assert verdict(measure_checkpoint(tmp_path / "heads.pt")) == ALL_PASS
    torch.save(payload(small_model, state_dict=sd), tmp_path / "smuggled.pt")  # same weights, one-head spec
    assert verdict(measure_checkpoint(tmp_path / "smuggled.pt")) == {**ALL_PASS, "models": False}


def test_an_integer_tensor_in_place_of_a_weight_is_a_weight(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["out.bias"] = (sd["out.bias"] * 1000).to(torch.int32)  # 68 values: "small", but it is a weight
    torch.save(payload(small_model, state_dict=sd), tmp_path / "i.pt")
    m = measure_checkpoint(tmp_path / "i.pt")
    assert verdict(m) == {**ALL_PASS, "dtypes": False} and m.weight_dtypes["int32"].tensors == 1
    assert m.bookkeeping_dtypes["int64"].tensors > 0  # BatchNorm's num_batches_tracked stays bookkeeping


def test_measuring_a_checkpoint_without_torch_names_the_extra(tmp_path, small_model, monkeypatch):
    path = save_checkpoint(tmp_path / "best.pt", small_model)
    monkeypatch.setitem(sys.modules, "torch", None)  # a runtime-only install: `import torch` fails
    with pytest.raises(UsageError, match=r"measuring a checkpoint needs torch") as e:
        measure(str(path))
    assert e.value.example == "pip install 'flm[train]'"
    assert main(["check-budget", str(path)]) == 2


def test_weightless_checkpoints_fail(tmp_path, small_model):
    zeros = {k: torch.zeros_like(v) for k, v in small_model.state_dict().items()}
    torch.save(payload(small_model, state_dict=zeros), tmp_path / "z.pt")
    m = measure_checkpoint(tmp_path / "z.pt")
    assert verdict(m) == {**ALL_PASS, "weights": False}
    assert "are zero" in next(r.measured for r in evaluate(m) if r.rule == "weights")
    torch.save(payload(small_model, state_dict={}), tmp_path / "empty.pt")
    m = measure_checkpoint(tmp_path / "empty.pt")
    assert verdict(m)["weights"] is False and m.weight_elements == 0


def test_stray_tensor_outside_state_dict_is_still_checked(tmp_path, small_model):
    torch.save(payload(small_model, extra=torch.ones(2000, dtype=torch.float16)), tmp_path / "s.pt")
    m = measure_checkpoint(tmp_path / "s.pt")
    assert verdict(m)["dtypes"] is False and any("outside any state_dict" in n for n in m.notes)


def test_one_byte_over_the_limit(tmp_path, small_model):
    path = save_checkpoint(tmp_path / "best.pt", small_model)
    m = measure_checkpoint(path)
    toml = tmp_path / "edge.toml"
    toml.write_text(f"[at-limit]\nmax_bytes = {m.size_bytes}\n\n[one-under]\nmax_bytes = {m.size_bytes - 1}\n")
    budgets = load_budgets(toml)
    assert verdict(m, budgets["at-limit"]) == ALL_PASS
    assert verdict(m, budgets["one-under"]) == {**ALL_PASS, "size": False}
    with pytest.raises(BudgetExceeded, match=f"{m.size_bytes:,} bytes"):
        enforce(evaluate(m, budgets["one-under"]), budgets["one-under"])


# --------------------------------------------------------------------------- ONNX


def onnx_model(weights: list[np.ndarray], two_nets: bool = False) -> onnx.ModelProto:
    """x (1, 8) -> MatMul by each weight in turn -> y; optionally a second, disconnected net on x."""
    inits, nodes, cur = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        cast = w.dtype != np.float32
        if cast:
            nodes.append(helper.make_node("Cast", [f"w{i}"], [f"w{i}f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}f" if cast else f"w{i}"], [f"h{i}"]))
        cur = f"h{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])]
    if two_nets:
        inits.append(numpy_helper.from_array(np.ones((8, 8), np.float32), "v"))
        nodes.append(helper.make_node("MatMul", ["x", "v"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, None]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def rand(*shape, dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def save(model, path, **kw) -> str:
    onnx.save_model(model, str(path), **kw)
    return str(path)


def test_onnx_float32_passes_and_runs(tmp_path):
    import onnxruntime as ort

    p = save(onnx_model([rand(8, 8), rand(8, 4)]), tmp_path / "ok.onnx")
    ort.InferenceSession(p).run(None, {"x": rand(1, 8)})  # a real, loadable model
    m = measure_onnx(p)
    assert verdict(m) == ALL_PASS and m.models == 1
    assert m.size_basis == "disk" and m.size_bytes == os.path.getsize(p)
    assert m.weight_elements == 8 * 8 + 8 * 4


def test_onnx_float16_initializers_fail(tmp_path):
    m = measure_onnx(save(onnx_model([rand(8, 8, dtype=np.float16)]), tmp_path / "h.onnx"))
    assert verdict(m) == {**ALL_PASS, "dtypes": False} and m.weight_dtypes["float16"].elements == 64


def test_onnx_int8_initializers_fail(tmp_path):
    m = measure_onnx(save(onnx_model([rand(8, 8), (rand(8, 8) * 20).astype(np.int8)]), tmp_path / "q.onnx"))
    assert verdict(m) == {**ALL_PASS, "dtypes": False} and m.weight_dtypes["int8"].tensors == 1


def test_onnx_without_weights_fails(tmp_path):
    m = measure_onnx(save(onnx_model([]), tmp_path / "none.onnx"))
    assert verdict(m) == {**ALL_PASS, "weights": False} and m.weight_elements == 0
    m = measure_onnx(save(onnx_model([np.zeros((8, 8), np.float32)]), tmp_path / "zero.onnx"))
    assert verdict(m) == {**ALL_PASS, "weights": False}


def test_onnx_constant_node_weights_are_found(tmp_path):
    model = onnx_model([])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value_floats=[0.5] * 64))
    model.graph.node[-1].CopyFrom(helper.make_node("Mul", ["x", "w"], ["y"]))
    m = measure_onnx(save(model, tmp_path / "c.onnx"))
    assert verdict(m) == ALL_PASS and m.weight_dtypes["float32"].elements == 64
    half = helper.make_tensor("w", TensorProto.FLOAT16, [64], np.full(64, 0.5, np.float16).view(np.uint16))
    model.graph.node[0].CopyFrom(helper.make_node("Constant", [], ["w"], value=half))
    m = measure_onnx(save(model, tmp_path / "h.onnx"))
    assert verdict(m) == {**ALL_PASS, "dtypes": False} and m.weight_dtypes["float16"].elements == 64


def int_weights_onnx(how: str) -> onnx.ModelProto:
    """x (1, 32) @ W with W stored as a 32x32 integer tensor, the way quantized weights smuggle in:
    "initializer"/"constant": int32 q (an initializer / a Constant node), W = Cast(q) * 0.01;
    "codebook": int64 indices into a 16-value float table, W = Gather(table, indices)."""
    q = (rand(32, 32) * 50).astype(np.int32)
    nodes = [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qf", "scale"], ["w"])]
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "scale")]
    if how == "initializer":
        inits.append(numpy_helper.from_array(q, "q"))
    elif how == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["q"], value=numpy_helper.from_array(q, "q")))
    else:
        inits = [numpy_helper.from_array(rand(16), "table"),
                 numpy_helper.from_array(np.abs(q).astype(np.int64) % 16, "idx")]
        nodes = [helper.make_node("Gather", ["table", "idx"], ["w"])]
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("how", ["initializer", "constant", "codebook"])
def test_onnx_integer_weights_fail_the_float32_rule(tmp_path, how):
    import onnxruntime as ort

    p = save(int_weights_onnx(how), tmp_path / f"{how}.onnx")
    y = ort.InferenceSession(p).run(None, {"x": rand(1, 32)})[0]  # a real model: its weights do work
    assert y.shape == (1, 32) and np.abs(y).max() > 0.1
    m = measure_onnx(p)
    dtype = "int64" if how == "codebook" else "int32"
    assert m.weight_dtypes[dtype].elements == 1024 and dtype not in m.bookkeeping_dtypes
    assert verdict(m) == {**ALL_PASS, "dtypes": False}
    with pytest.raises(BudgetExceeded, match=f"dtypes: not allowed: {dtype}: 1 tensor"):
        enforce(evaluate(m))


def test_onnx_shape_and_index_integers_stay_bookkeeping(tmp_path):
    """Integers that only shape the computation, directly or through shape arithmetic, are not weights."""
    import onnxruntime as ort

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], np.int64))),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),  # indices into computed values
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["to"], axis=0),  # shape arithmetic, then a shape
             helper.make_node("Reshape", ["h", "to"], ["h2"]),
             helper.make_node("ReduceSum", ["h2", "axes"], ["y"], keepdims=1)]
    inits = [numpy_helper.from_array(rand(8, 8), "w"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    p = save(model, tmp_path / "shapes.onnx")
    ort.InferenceSession(p).run(None, {"x": rand(1, 8)})
    m = measure_onnx(p)
    assert verdict(m) == ALL_PASS and set(m.weight_dtypes) == {"float32"}
    assert m.bookkeeping_dtypes["int64"].tensors == 3


def test_onnx_disconnected_networks_count_as_two(tmp_path):
    m = measure_onnx(save(onnx_model([rand(8, 8)], two_nets=True), tmp_path / "two.onnx"))
    assert m.models == 2 and verdict(m) == {**ALL_PASS, "models": False}


def test_onnx_external_data_is_counted(tmp_path):
    p = save(onnx_model([rand(8, 64), rand(64, 8, dtype=np.float16)]), tmp_path / "ext.onnx",
             save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    m = measure_onnx(p)
    assert m.disk_bytes == os.path.getsize(p) + os.path.getsize(tmp_path / "ext.bin")
    assert os.path.getsize(tmp_path / "ext.bin") > os.path.getsize(p)  # the weights really are outside
    assert m.weight_dtypes["float16"].elements == 512 and m.weight_dtypes["float32"].elements == 512
    assert verdict(m)["dtypes"] is False


@pytest.mark.parametrize("where", ["../outside.bin", "ABSOLUTE"])
def test_onnx_external_data_escaping_the_folder_is_refused(tmp_path, where):
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "outside.bin"
    w = rand(8, 8)
    outside.write_bytes(w.tobytes())
    model = onnx_model([w])
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    location = str(outside) if where == "ABSOLUTE" else where
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        t.external_data.add(key=k, value=v)
    p = save(model, folder / "m.onnx")
    with pytest.raises(ModelFileError, match="escapes the model's folder"):
        measure_onnx(p)
    assert main(["check-budget", p]) == 1


# --------------------------------------------------------------------------- Core ML


@pytest.fixture(scope="module")
def coreml_packages(tmp_path_factory):
    ct = pytest.importorskip("coremltools")  # part of flm[export]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(1, 1, 8, 8)
    traced = torch.jit.trace(net, x)
    out = tmp_path_factory.mktemp("coreml")
    paths = {}
    for name, kw in (("default", {}), ("fp32", {"compute_precision": ct.precision.FLOAT32})):
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram", **kw)
        paths[name] = out / f"{name}.mlpackage"
        ml.save(str(paths[name]))
    return paths, sum(p.numel() for p in net.parameters())


def test_coreml_default_precision_is_float16_and_fails(coreml_packages):
    paths, n_params = coreml_packages
    m = measure_coreml(paths["default"])
    assert verdict(m) == {**ALL_PASS, "dtypes": False}
    assert m.weight_dtypes["float16"].elements >= n_params  # every weight was converted to float16
    assert "float32" not in m.weight_dtypes or m.weight_dtypes["float32"].elements < n_params


def test_coreml_float32_package_passes(coreml_packages):
    paths, n_params = coreml_packages
    m = measure(str(paths["fp32"]))
    assert verdict(m) == ALL_PASS and set(m.weight_dtypes) == {"float32"}
    assert m.weight_elements == n_params  # blob weights + immediate biases, nothing missed
    assert m.size_bytes == size_of(paths["fp32"]) and m.models == 1
    assert main(["check-budget", str(paths["fp32"])]) == 0
    assert main(["check-budget", str(paths["default"])]) == 1


def test_coreml_integer_weights_fail_the_float32_rule(tmp_path):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    from flm.exporters.mil_eval import MilProgram

    q = (rand(32, 32) * 50).astype(np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 32))], opset_version=ct.target.iOS16)
    def prog(x):
        w = mb.mul(x=mb.cast(x=mb.const(val=q), dtype="fp32"), y=np.float32(0.01))
        return mb.matmul(x=mb.reshape(x=x, shape=[1, 32]), y=w, name="y")

    # no optimisation passes: the converter would otherwise fold cast(q) * 0.01 into float32 weights
    ml = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                    minimum_deployment_target=ct.target.iOS16, pass_pipeline=ct.PassPipeline.EMPTY)
    path = tmp_path / "int.mlpackage"
    ml.save(str(path))
    y = MilProgram(path).run({"x": np.ones((1, 32), np.float32)})["y"]  # a real program: its weights work
    np.testing.assert_allclose(y, q.sum(0, keepdims=True) * 0.01, rtol=1e-5)
    m = measure_coreml(path)
    assert m.weight_dtypes["int32"].elements == 1024 and verdict(m) == {**ALL_PASS, "dtypes": False}
    assert m.bookkeeping_dtypes["int32"].elements == 2  # reshape's shape stays bookkeeping


def test_coreml_multifunction_package_is_two_models(coreml_packages, tmp_path):
    ct = pytest.importorskip("coremltools")
    paths, _ = coreml_packages
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(1, 1, 8, 8)
    ml = ct.convert(torch.jit.trace(other, x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                    convert_to="mlprogram", compute_precision=ct.precision.FLOAT32)
    ml.save(str(tmp_path / "other.mlpackage"))
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(paths["fp32"]), src_function_name="main", target_function_name="conv")
    desc.add_function(str(tmp_path / "other.mlpackage"), src_function_name="main", target_function_name="linear")
    desc.default_function_name = "conv"
    both = tmp_path / "both.mlpackage"
    ct.utils.save_multifunction(desc, str(both))
    m = measure(str(both))
    assert m.models == 2 and verdict(m) == {**ALL_PASS, "models": False}
    assert main(["check-budget", str(both)]) == 1
    assert measure(str(tmp_path / "other.mlpackage")).models == 1  # each function alone is one model


def test_coreml_corrupt_weight_blob_is_refused(coreml_packages, tmp_path):
    import shutil

    paths, _ = coreml_packages
    pkg = tmp_path / "bad.mlpackage"
    shutil.copytree(paths["fp32"], pkg)
    blob = next(pkg.rglob("weight.bin"))
    data = bytearray(blob.read_bytes())
    assert struct.unpack_from("<I", data, 64)[0] == 0xDEADBEEF  # first blob record
    data[64:68] = b"\0\0\0\0"
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt blob record"):
        measure_coreml(pkg)


def test_coreml_neural_network_weights(tmp_path):
    pytest.importorskip("coremltools")
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.models.utils import save_spec

    builder = NeuralNetworkBuilder([("x", datatypes.Array(8))], [("y", datatypes.Array(4))])
    builder.add_inner_product("fc", W=rand(4, 8), b=np.ones(4, np.float32), input_channels=8, output_channels=4,
                              has_bias=True, input_name="x", output_name="y")
    spec = builder.spec
    save_spec(spec, str(tmp_path / "fp32.mlmodel"))
    m = measure_coreml(tmp_path / "fp32.mlmodel")
    assert verdict(m) == ALL_PASS and m.weight_elements == 36
    fc = spec.neuralNetwork.layers[0].innerProduct
    fc.weights.float16Value = rand(4, 8).astype(np.float16).tobytes()
    fc.weights.ClearField("floatValue")
    save_spec(spec, str(tmp_path / "fp16.mlmodel"))
    m = measure_coreml(tmp_path / "fp16.mlmodel")
    assert verdict(m) == {**ALL_PASS, "dtypes": False} and m.weight_dtypes["float16"].elements == 32
    fc.weights.ClearField("float16Value")
    fc.weights.int8RawValue = (rand(4, 8) * 20).astype(np.int8).tobytes()
    save_spec(spec, str(tmp_path / "int8.mlmodel"))
    assert verdict(measure_coreml(tmp_path / "int8.mlmodel"))["dtypes"] is False


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_json(tmp_path, capsys):
    assert main(["check-budget", "shufflenet-heatmap"]) == 0
    report = tmp_path / "r.json"
    assert main(["check-budget", "resnet18-regressor", "--json", str(report)]) == 1
    err = capsys.readouterr().err
    assert "budget 'challenge-15mb' failed: size: 45.00 MB" in err
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["budget"]["max_bytes"] == 15_000_000
    assert [r["rule"] for r in data["rules"] if not r["passed"]] == ["size"]
    assert data["measurement"]["parameters"] == 11_240_008
    assert main(["check-budget", "shufflenet-heatmap", "--budget", "mobile-5mb"]) == 1
    assert main(["check-budget", "no-such-model"]) == 2
    assert main(["check-budget", "shufflenet-heatmap", "--budget", "nope"]) == 2


def test_cli_help_and_models(capsys):
    main(["check-budget", "--help"])
    assert "10^6 bytes" in capsys.readouterr().out
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    rows = {}
    for line in table.splitlines():  # first table only (a narrow terminal adds a description table)
        if line.strip():
            rows.setdefault(line.split()[0], line.split())
    assert rows["resnet18-regressor"][-1] == "no" and rows["scn-98"][-1] == "no"
    assert rows["shufflenet-heatmap"][-1] == "yes" and rows["resnet-regressor"][-1] == "yes"
    assert "45.00" in rows["resnet18-regressor"] and "11,240,008" in rows["resnet18-regressor"]


def test_train_refuses_a_preset_over_budget(capsys):
    assert main(["train", "--model", "resnet18-regressor", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "45.00 MB" in err and "resnet-regressor" in err


def test_a_shipped_model_is_checked_by_name(capsys):
    """`flm check-budget NAME` measures the shipped file of that name (the same figures as its path);
    an unknown name lists the shipped models and the presets."""
    from flm.bundled import shipped_paths
    path = shipped_paths()["flm-68-fast"]
    assert main(["check-budget", "flm-68-fast"]) == 0
    by_name = capsys.readouterr().out
    assert main(["check-budget", str(path)]) == 0
    by_path = capsys.readouterr().out
    assert "flm-68-fast fits budget challenge-15mb" in by_name
    assert by_name.replace("flm-68-fast", "X") == by_path.replace(str(path), "X")
    assert main(["check-budget", "flm-99"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "a model flm ships (" in err and "flm-68-fast" in err and "shufflenet-heatmap" in err
