"""Shipped models by name: `FaceLandmarker.create(NAME)`, `flm detect --model NAME`, `flm models --shipped --json`.

Name resolution and listing run on a folder of small models the tests write themselves (any
number of them, one named as the default); the real `flm/assets` is listed too, through the
CLI in a fresh interpreter without torch, and its JSON is checked against the files' own specs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from flm.errors import ModelFileError, UsageError
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
from flm.runtime.modelfile import open_session, read_spec
from flm.runtime.shipped import ASSETS, DEFAULT_NAME, is_model_name, resolve_model, shipped_models, shipped_paths

from tests.helpers.runtime import blob_image, dot_finder_onnx

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A stand-in for flm/assets: the default name and two more models of different input sizes,
    plus a file that is not a model file by its suffix."""
    d = tmp_path_factory.mktemp("assets")
    dot_finder_onnx(d / f"{DEFAULT_NAME}.onnx", size=64)
    dot_finder_onnx(d / "fast.onnx", size=32)
    dot_finder_onnx(d / "wide.onnx", size=48, channels=3)
    (d / "MODEL_CARD.md").write_text("# cards are not models\n")
    return d


def _cli(*args, block_torch: bool = False, cwd=REPO):
    """Run `flm ARGS` in a fresh interpreter; optionally with torch made unimportable."""
    code = ("import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "")
            + "from flm.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# --------------------------------------------------------------------------- names


def test_names_are_file_stems_and_each_model_is_described_by_its_own_spec(assets):
    assert list(shipped_paths(assets)) == ["fast", DEFAULT_NAME, "wide"]
    listed = {m.name: m for m in shipped_models(assets)}
    assert {n: m.spec.input_size for n, m in listed.items()} == {"fast": 32, DEFAULT_NAME: 64, "wide": 48}
    assert listed["wide"].spec.channels == 3 and listed["fast"].spec.channels == 1
    assert [n for n, m in listed.items() if m.default] == [DEFAULT_NAME]
    d = listed["fast"].to_dict()
    assert Path(d["path"]).is_absolute() and Path(d["path"]) == (assets / "fast.onnx").resolve()
    assert d["mb"] == round((assets / "fast.onnx").stat().st_size / 1e6, 2) and d["default"] is False


def test_a_name_resolves_to_its_file_and_none_to_the_default(assets):
    assert resolve_model("fast", assets=assets) == (assets / "fast.onnx").resolve()
    assert resolve_model(None, assets=assets) == (assets / f"{DEFAULT_NAME}.onnx").resolve()
    # paths stay paths, whether or not they exist (opening them reports what is wrong)
    assert resolve_model("models/fast", assets=assets) == Path("models/fast")
    assert resolve_model("fast.onnx", assets=assets) == Path("fast.onnx")
    assert resolve_model(Path("fast"), assets=assets) == Path("fast")


def test_a_training_checkpoint_is_refused_with_the_export_that_makes_a_runnable_file(assets):
    with pytest.raises(UsageError, match="runs/best.pt: a training checkpoint") as e:
        resolve_model("runs/best.pt", assets=assets)  # was an onnxruntime protobuf error
    assert e.value.example.startswith("flm export runs/best.pt --target onnx")
    assert "FaceLandmarker.create('exported/model.onnx')" in e.value.example


def test_what_reads_as_a_name():
    assert is_model_name("flm-68") and is_model_name("fast_v2") and is_model_name("")
    assert not is_model_name("runs/export/model") and not is_model_name("model.onnx")
    assert not is_model_name("MODEL.ONNX")


def test_an_existing_file_wins_over_a_name(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(assets / "wide.onnx", tmp_path / "fast")  # a file called "fast" in the working folder
    assert resolve_model("fast", assets=assets) == Path("fast")


def test_an_unknown_name_is_one_line_listing_the_names_with_an_example(assets):
    with pytest.raises(UsageError) as e:
        resolve_model("fats", assets=assets)
    msg = str(e.value)
    assert "\n" not in msg and "'fats'" in msg
    assert f"fast, {DEFAULT_NAME} (default), wide" in msg
    assert f"e.g. FaceLandmarker.create('{DEFAULT_NAME}')" in msg
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match=r"e\.g\. --model flm-68"):
        resolve_model("fats", example="--model {}", assets=assets)


def test_no_models_shipped(tmp_path):
    with pytest.raises(UsageError, match="none in this install"):
        resolve_model("fast", assets=tmp_path)
    with pytest.raises(ModelFileError, match="default model is not bundled"):
        resolve_model(None, assets=tmp_path / "missing")
    assert shipped_models(tmp_path / "missing") == []


def test_create_with_an_unknown_name_or_a_bad_path(tmp_path):
    with pytest.raises(UsageError, match=r"unknown model 'no-such-model'.*shipped: .*e\.g\. FaceLandmarker\.create"):
        FaceLandmarker.create("no-such-model")
    with pytest.raises(ModelFileError, match="model file not found"):
        FaceLandmarker.create(str(tmp_path / "no-such-model"))  # has a separator: a path
    with pytest.raises(ModelFileError, match="model file not found"):
        FaceLandmarker.create("no-such-model.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="cannot load"):
        FaceLandmarker.create(str(junk))


# --------------------------------------------------------------------------- the real assets


needs_default = pytest.mark.skipif(not (ASSETS / f"{DEFAULT_NAME}.onnx").is_file(),
                                   reason=f"flm/assets/{DEFAULT_NAME}.onnx is not bundled in this checkout")


@needs_default
def test_create_by_name_is_the_same_model_as_by_path():
    by_name = FaceLandmarker.create(DEFAULT_NAME, FaceLandmarkerOptions(detector="none", threads=1))
    by_path = FaceLandmarker.create(ASSETS / f"{DEFAULT_NAME}.onnx", FaceLandmarkerOptions(detector="none", threads=1))
    default = FaceLandmarker.create(FaceLandmarkerOptions(detector="none", threads=1))
    assert by_name.source == by_path.source == default.source == str((ASSETS / f"{DEFAULT_NAME}.onnx").resolve())
    img = blob_image(96, 96, (40.0, 50.0), sigma=6.0, color=True)
    a, b = by_name.detect(img), by_path.detect(img)
    assert np.array_equal(a.faces[0].landmarks, b.faces[0].landmarks)


@needs_default
def test_models_shipped_json_without_torch_matches_the_files():
    p = _cli("models", "--shipped", "--json", block_torch=True)
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert isinstance(listed, list) and [m["name"] for m in listed] == sorted(m["name"] for m in listed)
    assert [m["name"] for m in listed if m["default"]] == [DEFAULT_NAME]
    assert {m["name"] for m in listed} == {p.stem for p in ASSETS.glob("*.onnx")}
    for m in listed:
        assert {"name", "path", "input_size", "mb", "default"} <= set(m)
        path = Path(m["path"])
        assert path.is_absolute() and path.is_file() and path.stem == m["name"]
        spec = read_spec(open_session(path, threads=1), str(path))
        assert (m["input_size"], m["points"], m["output"]) == (spec.input_size, spec.num_points, spec.output)
        assert (m["conventions"], m["gated"]) == (list(spec.conventions), bool(spec.build.get("gate")))
        assert m["mb"] == round(path.stat().st_size / 1e6, 2)


@needs_default
def test_models_shipped_table_names_the_default():
    p = _cli("models", "--shipped")
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith(DEFAULT_NAME + " "))
    assert "yes" in line and str(ASSETS / f"{DEFAULT_NAME}.onnx") in line
    default_spec = read_spec(open_session(ASSETS / f"{DEFAULT_NAME}.onnx", threads=1), DEFAULT_NAME)
    assert (" / ".join(default_spec.conventions) in line) and (("gate:" in line) == bool(default_spec.build.get("gate")))


def test_detect_with_an_unknown_name_exits_2_naming_the_shipped_models(tmp_path):
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), blob_image(64, 64, (30.0, 30.0), color=True))
    p = _cli("detect", str(photo), "--model", "flm-86", cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown model 'flm-86'" in lines[0] and "e.g. --model" in lines[0], p.stderr
    # a path that is not a model keeps its ModelFileError (exit 1)
    p = _cli("detect", str(photo), "--model", str(photo), cwd=tmp_path)
    assert p.returncode == 1 and "cannot load it as an ONNX model" in p.stderr


@needs_default
def test_detect_by_name(tmp_path):
    import cv2

    from flm.runtime.samples import astronaut_rgb

    photo = tmp_path / "astronaut.jpg"
    try:
        cv2.imwrite(str(photo), cv2.cvtColor(astronaut_rgb(), cv2.COLOR_RGB2BGR))
    except UsageError:
        pytest.skip("scikit-image (the demo extra, holding the sample photo) is not installed")
    p = _cli("detect", str(photo), "--model", DEFAULT_NAME, "--json", str(tmp_path / "faces.json"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "faces.json").read_text())
    assert doc["model"] == str((ASSETS / f"{DEFAULT_NAME}.onnx").resolve())
    assert len(doc["files"][0]["faces"]) == 1
