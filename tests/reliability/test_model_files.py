"""Model files from strangers: no code runs on load, and a truncated, foreign, spec-less or
wrong-point-count file is refused with a message naming it; ONNX external data stays in the
model's folder."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from flm.errors import ModelFileError, SpecError
from flm.pipeline.checkpoint import load_model, read_checkpoint, save_checkpoint
from flm.pipeline.models import build_model
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
from flm.spec import SPEC_METADATA_KEY, ModelSpec

from tests.helpers.checkpoints import payload


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build_model("shufflenet-heatmap", img_size=64, options={"width": 0.5})
    return model


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, small):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save(payload(small, extra=_Payload(str(marker))), evil)  # a real zip checkpoint, valid in every other way
    with pytest.raises(ModelFileError, match="evil.pt") as err:
        load_model(evil)
    assert "not a readable flm checkpoint" in str(err.value) and not marker.exists()
    assert "Python objects or code beside tensors, which flm never unpickles" in str(err.value)
    assert "weights_only" not in str(err.value)  # torch's own advice (load it unsafely) is not passed on
    with pytest.raises(ModelFileError):
        read_checkpoint(evil)
    assert not marker.exists()
    # negative control: the payload is live — a plain unpickling load does run it
    torch.load(evil, weights_only=False)
    assert marker.is_dir()
    # an old-style (non-zip) pickle of the same is refused too
    marker.rmdir()
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ModelFileError, match="legacy.pt"):
        load_model(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_checkpoints_that_are_not_usable_are_refused_with_the_reason(tmp_path, small):
    good = save_checkpoint(tmp_path / "good.pt", small)
    twelve = build_model("shufflenet-heatmap", spec=small.spec.with_(num_points=12, scheme="eyes12"),
                         options={"width": 0.5})
    spec = json.loads(small.spec.to_json())
    cases = {
        # 68-point spec, weights of a 12-point head
        "wrong-points.pt": (payload(small, state_dict=twelve.state_dict()), "weights do not match its spec"),
        "no-spec.pt": (payload(small, spec=None), "lacks its model spec"),
        "no-weights.pt": (payload(small, state_dict=None), "lacks its model spec or weights"),
        "bad-spec-json.pt": (payload(small, spec="{not json"), "not valid JSON"),
        "spec-68-says-12.pt": (payload(small, spec=json.dumps({**spec, "num_points": 12})), "has 68 points"),
        "other-format.pt": (payload(small, format="someone-else/3"), "not an flm checkpoint"),
        "list.pt": ([small.state_dict()], "not an flm checkpoint"),
        "unknown-preset.pt": (payload(small, spec=json.dumps({**spec, "preset": "nope"})), "nope"),
    }
    for name, (content, words) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises((ModelFileError, SpecError)) as err:
            load_model(tmp_path / name)
        assert name in str(err.value) and words in str(err.value), (name, str(err.value))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    for name in ("empty.pt", "folder.pt", "missing.pt"):
        with pytest.raises(ModelFileError, match=name):
            load_model(tmp_path / name)
    assert load_model(good).spec == small.spec  # control: the good file loads


def _external_model(folder, location: str, data: np.ndarray):
    """A one-node flm-spec ONNX (y = x + w) whose weight `w` is external data at `location`."""
    spec = ModelSpec(preset="dot-finder", num_points=1, scheme="dot1", input_size=32, channels=1,
                     color_order="GRAY", mean=(0.5,), std=(0.25,), output="coords")
    w = numpy_helper.from_array(data, "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(data.nbytes))):
        w.external_data.add(key=k, value=v)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["N", 1, 2])
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["m"], keepdims=1),  # (N, 1, 1, 1)
             helper.make_node("Reshape", ["m", "shape"], ["m1"]),  # (N, 1)
             helper.make_node("Add", ["m1", "w"], ["s"]),  # (N, 2): the mean, shifted by w
             helper.make_node("Unsqueeze", ["s", "ax"], ["landmarks"])]  # (N, 1, 2)
    inits = [w, numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    p = model.metadata_props.add()
    p.key, p.value = SPEC_METADATA_KEY, spec.to_json()
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("where", ["../outside.bin", "ABSOLUTE", "link.bin"])
def test_runtime_refuses_onnx_external_data_outside_the_models_folder(tmp_path, where):
    """onnxruntime >= 1.24 checks this itself; the runtime must turn it into a ModelFileError
    naming the file, and never read the outside file as weights."""
    data = np.array([16.0, 16.0], np.float32)
    secret = tmp_path / "outside.bin"
    secret.write_bytes(data.tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"ABSOLUTE": str(secret), "link.bin": "link.bin"}.get(where, where)
    if where == "link.bin":  # a name inside the folder that is a symlink to a file outside it
        os.symlink(secret, folder / "link.bin")
    path = _external_model(folder, location, data)
    with pytest.raises(ModelFileError) as err:
        FaceLandmarker.create(path, FaceLandmarkerOptions(detector="none"))
    assert "m.onnx" in str(err.value) and "external data" in str(err.value).lower(), err.value


def test_runtime_loads_onnx_external_data_inside_the_folder(tmp_path):
    """Control for the test above: the same model with its data beside it runs."""
    data = np.array([16.0, 16.0], np.float32)
    (tmp_path / "weights.bin").write_bytes(data.tobytes())
    lm = FaceLandmarker.create(_external_model(tmp_path, "weights.bin", data),
                               FaceLandmarkerOptions(detector="none", refine=0))
    assert len(lm.detect(np.zeros((32, 32), np.uint8)).faces) == 1


def _dynamic_points_model(path, produced: int, claimed: int):
    """A coordinate 'model' whose output shape no shape inference can know (the point count is
    computed from the input's values) and which produces `produced` points while its spec
    claims `claimed`."""
    spec = ModelSpec(preset="x", num_points=claimed, scheme="ibug68" if claimed == 68 else f"p{claimed}",
                     input_size=64, channels=1, color_order="GRAY", mean=(0.5,), std=(0.25,), output="coords")
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    f32 = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [i64("s0", [0]), i64("s1", [2 * produced]), i64("ax", [1]), i64("m1", [-1]), i64("two", [2]),
             f32("zero", [0.0]), f32("k", [float(produced)]), f32("scale", [100.0])]
    nodes = [helper.make_node("Flatten", ["input"], ["f"], axis=1),
             helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["sl"]),
             helper.make_node("Mul", ["sl", "scale"], ["pts"]),
             helper.make_node("ReduceMax", ["f"], ["mx"], keepdims=0), helper.make_node("Mul", ["mx", "zero"], ["z"]),
             helper.make_node("Add", ["z", "k"], ["kf"]), helper.make_node("Cast", ["kf"], ["ki"], to=TensorProto.INT64),
             helper.make_node("Concat", ["m1", "ki", "two"], ["shape"], axis=0),
             helper.make_node("Reshape", ["pts", "shape"], ["landmarks"])]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 64, 64])
    y = helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["N", "K", 2])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    p = model.metadata_props.add()
    p.key, p.value = SPEC_METADATA_KEY, spec.to_json()
    onnx.save(model, str(path))
    return path


def test_runtime_refuses_a_model_whose_answer_has_the_wrong_point_count(tmp_path):
    lm = FaceLandmarker.create(_dynamic_points_model(tmp_path / "five.onnx", 5, 68),
                               FaceLandmarkerOptions(detector="none", refine=0))
    with pytest.raises(ModelFileError, match=r"five\.onnx.*shape \[1, 5, 2\].*68 points"):
        lm.detect(np.full((64, 64), 128, np.uint8))
    # control: the same graph with an honest spec runs
    ok = FaceLandmarker.create(_dynamic_points_model(tmp_path / "honest.onnx", 5, 5),
                               FaceLandmarkerOptions(detector="none", refine=0, pose=False))
    assert ok.detect(np.full((64, 64), 128, np.uint8)).faces[0].landmarks.shape == (5, 2)


@pytest.fixture(scope="module")
def real_files(tmp_path_factory, small):
    d = tmp_path_factory.mktemp("mangle")
    return d, {"c.pt": save_checkpoint(d / "m.pt", small).read_bytes(),
               "o.onnx": _dynamic_points_model(d / "d.onnx", 68, 68).read_bytes()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["c.pt", "o.onnx", "r.onnx"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_model_file_readers_never_crash_on_mangled_bytes(real_files, name, cut, flips):
    """Truncations and byte flips of real files: loaded, or a ModelFileError / SpecError naming it."""
    from flm.exporters.onnx import open_onnx

    d, files = real_files
    base = files["c.pt" if name == "c.pt" else "o.onnx"]
    data = bytearray(base[: max(1, round(cut * len(base)))] if cut < 0.5 else base)
    for where, value in flips:
        data[min(len(data) - 1, int(where * len(data)))] = value
    (d / name).write_bytes(bytes(data))
    opener = {"c.pt": load_model, "o.onnx": open_onnx, "r.onnx": FaceLandmarker.create}[name]
    try:
        opener(d / name)
    except (ModelFileError, SpecError) as e:
        assert name in str(e)


def test_an_exported_file_given_as_a_checkpoint_says_what_it_is():
    onnx = Path(__file__).resolve().parents[2] / "flm" / "assets" / "flm-68-fast.onnx"
    with pytest.raises(ModelFileError, match="an exported model, not a checkpoint") as err:
        load_model(onnx)
    assert "flm-68-fast.onnx" in str(err.value) and err.value.example.startswith("runs/train/best.pt")
