"""`flm export` / `flm verify` end to end, and the checks that must fail: perturbed weights,
truncated and foreign files, a checkpoint that is not the file's, a bad target or extra."""

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from flm.cli import main
from flm.errors import ModelFileError, ParityError, UsageError
from flm.exporters import HEATMAPS, TARGETS, MissingExtra, Target, check_needs, resolve_targets
from flm.exporters.coreml import open_coreml
from flm.exporters.onnx import open_onnx
from flm.exporters.parity import MAX_DISPLACEMENT_PX, _structured_face, check, make_inputs
from flm.pipeline.checkpoint import load_model

from tests.helpers.checkpoints import perturbed_checkpoint, random_checkpoint


@pytest.fixture(scope="module")
def simple(tmp_path_factory, random_checkpoints):
    """A simple-cnn checkpoint, a perturbed copy, and both targets exported from each (via the CLI)."""
    root = tmp_path_factory.mktemp("simple")
    (root / "good").mkdir()
    # a copy of the session's: the export is written beside the checkpoint
    good = Path(shutil.copy(random_checkpoints("simple-cnn"), root / "good" / "best.pt"))
    bad = perturbed_checkpoint(good, root / "bad" / "best.pt")
    for ckpt in (good, bad):
        assert main(["export", str(ckpt), "--target", "all", "--samples", "2"]) == 0
    return {"good": good, "bad": bad, "root": root}


def test_export_all_no_decode_tensor_input_then_verify(tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path / "best.pt", "shufflenet-heatmap", img_size=64, options={"width": 0.5})
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--target", "all", "--no-decode", "--coreml-input", "tensor",
                 "--samples", "2", "--out", str(out), "--json", str(tmp_path / "parity.json")]) == 0
    reports = json.loads((tmp_path / "parity.json").read_text())
    assert [r["target"] for r in reports] == ["onnx", "coreml"]
    for r in reports:
        assert r["passed"] and [o["name"] for o in r["outputs"]] == [HEATMAPS]
        # still a landmark check: both sides' heatmaps decoded by the numpy soft-argmax
        assert 0 <= r["displacement_px"] <= MAX_DISPLACEMENT_PX
    assert sorted(p.name for p in out.iterdir()) == ["model.mlpackage", "model.onnx"]
    assert open_onnx(out / "model.onnx").outputs == [HEATMAPS]
    assert open_coreml(out / "model.mlpackage").input_kind == "tensor"
    capsys.readouterr()
    for name, runner in (("model.onnx", "onnxruntime"), ("model.mlpackage", "MIL evaluator")):
        assert main(["verify", str(out / name), "--against", str(ckpt), "--samples", "2"]) == 0
        assert runner in capsys.readouterr().out.replace("\n", " ")


@pytest.mark.parametrize("name", ["model.onnx", "model.mlpackage"])
def test_file_from_perturbed_weights_fails_verification(simple, name, tmp_path, capsys):
    good_file = simple["good"].parent / "export" / name
    bad_file = simple["bad"].parent / "export" / name
    assert main(["verify", str(good_file), "--against", str(simple["good"]), "--samples", "2"]) == 0
    capsys.readouterr()
    rc = main(["verify", str(bad_file), "--against", str(simple["good"]), "--samples", "2",
               "--json", str(tmp_path / "r.json")])
    assert rc == 1
    assert "FAILED" in capsys.readouterr().err
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"] and report["displacement_px"] > MAX_DISPLACEMENT_PX


def test_verify_on_dataset_crops(simple, tmp_path):
    data = _udacity_set(tmp_path / "faces", 3)
    ckpt = simple["good"]
    assert main(["verify", str(ckpt.parent / "export" / "model.onnx"), "--against", str(ckpt),
                 "--data", f"udacity:{data}", "--samples", "2", "--json", str(tmp_path / "r.json")]) == 0
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"].startswith("2 crops from udacity:") and report["samples"] == 2


def test_checkpoint_that_is_not_the_files_is_refused(simple, random_checkpoints):
    other = load_model(random_checkpoints("resnet-eyes"))
    opened = open_onnx(simple["good"].parent / "export" / "model.onnx")
    with pytest.raises(ParityError, match="spec differs"):
        check(opened, other, make_inputs(other.spec, 1))


def test_truncated_and_foreign_onnx_files_give_clear_errors(simple, tmp_path, capsys):
    good = (simple["good"].parent / "export" / "model.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    foreign = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    for name, message in (("trunc.onnx", "not a readable ONNX model"), ("noise.onnx", "not a readable ONNX model"),
                          ("foreign.onnx", "not an flm model: no 'flm.spec'"), ("missing.onnx", "not found")):
        with pytest.raises(ModelFileError, match=message):
            open_onnx(tmp_path / name)
        assert main(["verify", str(tmp_path / name), "--against", str(simple["good"])]) == 1
        err = capsys.readouterr().err
        assert name in err and message in err.replace("\n", "")


def test_truncated_and_foreign_coreml_packages_give_clear_errors(simple, tmp_path):
    src = simple["good"].parent / "export" / "model.mlpackage"
    weights, spec_file = "Data/com.apple.CoreML/weights/weight.bin", "Data/com.apple.CoreML/model.mlmodel"
    cut_weights = shutil.copytree(src, tmp_path / "w.mlpackage")
    (cut_weights / weights).write_bytes((src / weights).read_bytes()[:1000])
    cut_spec = shutil.copytree(src, tmp_path / "s.mlpackage")
    (cut_spec / spec_file).write_bytes((src / spec_file).read_bytes()[:500])
    (tmp_path / "empty.mlpackage").mkdir()
    foreign = _foreign_package(tmp_path / "foreign.mlpackage")
    for path, message in ((cut_weights, "weight.bin is truncated"), (cut_spec, "not a readable Core ML model"),
                          (tmp_path / "empty.mlpackage", "not a Core ML package"),
                          (foreign, "not an flm model: no 'flm.spec'")):
        with pytest.raises(ModelFileError, match=message):
            open_coreml(path).predict(make_inputs(load_model(simple["good"]).spec, 1).pixels)


def test_failed_check_leaves_no_file_at_the_final_path(simple, tmp_path):
    """Export flow on a file that cannot pass: the final path stays absent, the failure is kept."""
    from flm.exporters.commands import export_target

    model = load_model(simple["good"])
    final = tmp_path / "model.onnx"
    good_report = export_target(model, TARGETS["onnx"], final, make_inputs(model.spec, 1), {})
    assert good_report.passed and final.is_file()
    before = final.read_bytes()
    # the Core ML float16 program is the real failing file; an earlier good file stays as it was
    with pytest.raises(ParityError):
        export_target(model, TARGETS["coreml"], tmp_path / "model.mlpackage", make_inputs(model.spec, 1),
                      {"precision": "float16"})
    assert not (tmp_path / "model.mlpackage").exists() and (tmp_path / "model.failed.mlpackage").is_dir()
    assert final.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_targets_are_validated_before_any_work(tmp_path, capsys):
    assert [t.name for t in resolve_targets("all")] == ["onnx", "coreml"]
    for bad in ("ONNX", "tflite", "onnx,coreml"):
        with pytest.raises(UsageError, match=f"unknown export target '{bad}'") as err:
            resolve_targets(bad)  # quoted, never silently rewritten to a near match
        assert err.value.example and "--target onnx" in err.value.example
    assert main(["export", str(tmp_path / "missing.pt"), "--target", "tflite", "--out", str(tmp_path / "o")]) == 2
    assert "'tflite'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    needy = Target("x", ".x", "model.x", (), ("numpy", "flm_no_such_module_xyz"), "a:b", "a:b", "test target")
    with pytest.raises(MissingExtra, match=r"flm_no_such_module_xyz.*pip install 'flm\[export\]'"):
        check_needs([needy])
    check_needs(list(TARGETS.values()))  # installed here: no error


def test_generated_inputs_are_structured_faces():
    rng = np.random.default_rng(0)
    img, box = _structured_face(rng)
    face = img[int(box[0, 1]):int(box[1, 1]), int(box[0, 0]):int(box[1, 0])]
    assert img.dtype == np.uint8 and face.std() > 10  # features, not a flat patch
    spec = load_model_spec("resnet-eyes")
    x = make_inputs(spec, 3)
    assert x.tensor.shape == (3, 1, 96, 96) and x.pixels.shape == (3, 1, 96, 96)
    assert x.pixels.min() >= 0 and x.pixels.max() <= 255 and np.ptp(x.tensor) > 1
    # the tensor is exactly the pixels normalised with the spec
    np.testing.assert_allclose(x.tensor, (x.pixels / 255.0 - spec.mean[0]) / spec.std[0], atol=1e-5)


def load_model_spec(preset):
    from flm.pipeline.models import PRESETS
    return PRESETS[preset].spec


def _udacity_set(root, n):
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img, box = _structured_face(np.random.default_rng(10 + i))
        cv2.imwrite(str(root / "images" / f"face{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        c, r = box.mean(axis=0), (box[1] - box[0]) / 2
        pts = np.stack([c[0] + r[0] * np.cos(t), c[1] + r[1] * np.sin(t)], axis=1)
        rows.append([f"face{i}.png", *pts.reshape(-1).round(3)])
    with open(root / "landmarks.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _foreign_package(path):
    from flm.exporters.coreml import import_coremltools

    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.relu(x=x, name="y")

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16).save(str(path))
    return path
