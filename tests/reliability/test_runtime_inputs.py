"""The runtime under odd images, many threads and many calls.

The model is a tiny hand-built ONNX 68-point regressor (a template face shifted by the crop's
mean brightness, so every image has its own answer) carrying a real flm spec: it runs in well
under a millisecond, so 10,000 calls fit in a test, and it needs no torch to build.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flm.errors import DatasetError
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions, InvalidInputError
from flm.spec import SPEC_METADATA_KEY, ModelSpec

from tests.helpers.cli import ENV
from tests.helpers.runtime import HAAR_SEEDS, faces_image, template_68

S = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pts = (template_68() * 0.4 + 0.5) * (S - 1)
    spec = ModelSpec(preset="tiny", num_points=68, scheme="ibug68", input_size=S, channels=1, color_order="GRAY",
                     mean=(0.5,), std=(0.25,), output="coords")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, S, S])
    y = helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["N", 68, 2])
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["m"], keepdims=1),  # (N, 1, 1)
             helper.make_node("Mul", ["m", "k"], ["mk"]),
             helper.make_node("Add", ["mk", "template"], ["landmarks"])]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.full((1, 1, 1), 2.0, np.float32), "k"),
             numpy_helper.from_array(pts.astype(np.float32)[None], "template")]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    p = model.metadata_props.add()
    p.key, p.value = SPEC_METADATA_KEY, spec.to_json()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- odd images


def test_huge_black_image_is_handled_in_bounded_time(tiny):
    """8000 x 8000 (192 MB): no face with the default detector, one whole-image face with "none"."""
    big = np.zeros((8000, 8000, 3), np.uint8)
    t = time.perf_counter()
    r = FaceLandmarker.create(tiny).detect(big)
    assert r.faces == [] and r.image_size == (8000, 8000)
    one = FaceLandmarker.create(tiny, FaceLandmarkerOptions(detector="none")).detect(big)
    assert len(one.faces) == 1 and np.isfinite(one.faces[0].landmarks).all()
    assert time.perf_counter() - t < 60, "bounded: seconds, not minutes"


@pytest.mark.parametrize("detector", ["haar", "none"])
def test_all_black_and_all_white_images(tiny, detector):
    lm = FaceLandmarker.create(tiny, FaceLandmarkerOptions(detector=detector))
    for value in (0, 255):
        r = lm.detect(np.full((240, 320, 3), value, np.uint8))
        if detector == "haar":
            assert r.faces == [] and r is not None
        else:
            assert len(r.faces) == 1 and np.isfinite(r.faces[0].landmarks).all()
            assert r.faces[0].pose is None or np.isfinite([r.faces[0].pose.yaw, r.faces[0].pose.pitch]).all()


@pytest.mark.parametrize("image, words", [
    (np.zeros((0, 10, 3), np.uint8), "shape"),
    (np.zeros((10, 0), np.uint8), "shape"),
    (np.zeros((5, 5, 5), np.uint8), "shape"),
    (np.zeros((2, 3, 4, 5), np.uint8), "shape"),
    (np.full((20, 20), np.inf, np.float32), "NaN or inf"),
    (np.array([[np.nan]], np.float64), "NaN or inf"),
    (np.zeros((8, 8, 3), np.complex64), "dtype"),
    ("not an image, a string that is no file", "not found"),
    (None, "numpy array or a path"),
])
def test_unusable_images_raise_a_typed_error(tiny, image, words):
    lm = FaceLandmarker.create(tiny, FaceLandmarkerOptions(detector="none"))
    with pytest.raises((InvalidInputError, DatasetError), match=words):
        lm.detect(image)


def test_tiny_and_odd_but_valid_images(tiny):
    lm = FaceLandmarker.create(tiny, FaceLandmarkerOptions(detector="none"))
    for image in (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.float32), np.zeros((7, 3000), np.uint8)):
        r = lm.detect(image)
        assert r is not None and r.faces == []  # too small to hold a face: empty, never None
    # app boxes on a 1 x 1 image still give finite points (the crop is padded with zeros)
    r = lm.detect(np.zeros((1, 1, 3), np.uint8), boxes=[(0, 0, 1, 1)])
    assert len(r.faces) == 1 and np.isfinite(r.faces[0].landmarks).all()
    for image in (np.full((40, 40), 70000, np.int64), np.ones((40, 40, 1), bool), np.full((40, 40, 4), 2.0)):
        assert len(lm.detect(image).faces) == 1  # out-of-range values are clipped, not wrapped


# --------------------------------------------------------------------------- threads


def test_eight_threads_on_one_landmarker_match_sequential(tiny):
    """Shared use is safe: every thread gets exactly the sequential answer, and nothing raises.
    A fixed amount of work, not a time window: how many calls fit in a few seconds depends on the
    machine's load, and speed is measured in benchmarks/ (memory: the test below)."""
    lm = FaceLandmarker.create(tiny, FaceLandmarkerOptions(detector="haar", refine=1, threads=2))
    images = [faces_image(seed)[0] for seed in HAAR_SEEDS[:8]]
    expected = [lm.detect(img) for img in images]
    assert all(len(r.faces) == 1 for r in expected)
    # control: the images give different answers, so a mix-up between threads would show
    assert min(np.abs(expected[i].faces[0].landmarks - expected[j].faces[0].landmarks).max()
               for i in range(8) for j in range(i)) > 0.5
    barrier = threading.Barrier(8)
    calls, problems = [0] * 8, []

    def work(i):
        try:
            barrier.wait()
            for step in range(8):
                k = (i + step) % 8  # every thread goes through every image, each starting at its own
                got = lm.detect(images[k])
                want = expected[k].faces[0]
                if len(got.faces) != 1 or not np.allclose(got.faces[0].landmarks, want.landmarks, atol=1e-6) \
                        or not np.allclose(got.faces[0].detection_box, want.detection_box):
                    problems.append((i, k, "differs from the sequential result"))
                calls[i] += 1
        except Exception as e:  # noqa: BLE001 - an error in a thread must fail the test, not vanish
            problems.append((i, None, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)  # a guard against a deadlock, not a speed limit
    assert not any(t.is_alive() for t in threads), "a thread is stuck in detect()"
    assert not problems, problems[:5]
    assert calls == [8] * 8, calls


# --------------------------------------------------------------------------- memory


MEMORY_SCRIPT = """
import gc, json, sys
import numpy as np, psutil
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
lm = FaceLandmarker.create(sys.argv[1], FaceLandmarkerOptions(detector="none", refine=1, threads=1))
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(16)]
proc = psutil.Process()
for i in range(500):  # warm-up: onnxruntime's arena, OpenCV's buffers, numpy's caches
    lm.detect(images[i % 16])
gc.collect()
before = proc.memory_info().rss
for i in range(10_000):
    r = lm.detect(images[i % 16])
gc.collect()
after = proc.memory_info().rss
kept = [lm.detect(images[i % 16]) for i in range(3000)]  # control: results that are kept do show
control = proc.memory_info().rss
print(json.dumps({"grown_mb": (after - before) / 1e6, "control_mb": (control - after) / 1e6,
                  "faces": len(r.faces), "pose": r.faces[0].pose is not None}))
"""


def test_no_memory_growth_over_ten_thousand_calls(tiny):
    """In a fresh process (RSS here would hide a leak in memory freed by earlier tests)."""
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["faces"] == 1 and m["pose"], m  # the whole pipeline ran, head pose included
    assert m["grown_mb"] < 20, f"RSS grew by {m['grown_mb']:.1f} MB over 10,000 calls"
    assert m["control_mb"] > 5, m  # the measure does see memory that is kept
