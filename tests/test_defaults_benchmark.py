"""benchmarks/defaults.py: the fit that sets the runtime's detector box corrections, and the
runtime's defaults agreeing with the benchmark's last recorded run.

The benchmark itself runs on ../shared data (minutes); here its fitting function is checked on
generated box pairs whose true correction is known, and the code's constants against
benchmarks/results/defaults.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
from flm.runtime.detectors import BoxAdjust, HaarDetector, YuNetDetector

from tests.helpers.runtime import dot_finder_onnx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def defaults():
    spec = importlib.util.spec_from_file_location("bench_defaults", REPO / "benchmarks" / "defaults.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _detector_box(gt, a: BoxAdjust):
    """The detector box that `a` maps exactly onto the landmark box `gt` (BoxAdjust.apply inverted)."""
    w, h = (gt[2] - gt[0]) / a.sw, (gt[3] - gt[1]) / a.sh
    cx = (gt[0] + gt[2]) / 2 - a.dx * w
    cy = (gt[1] + gt[3]) / 2 - a.dy * h
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_fit_box_adjust_recovers_known_constants(defaults):
    truth = BoxAdjust(dx=-0.03, dy=0.14, sw=0.88, sh=0.79)
    rng = np.random.default_rng(0)
    detections, gts, expect_matched = [], [], 0
    for i in range(300):
        x0, y0, side = rng.uniform(0, 400), rng.uniform(0, 400), rng.uniform(40, 200)
        gt = np.array([x0, y0, x0 + side * rng.uniform(0.9, 1.1), y0 + side])
        good = _detector_box(gt, truth) * (1 + rng.normal(0, 0.004, 4))  # small jitter
        far = gt + 1000  # another face elsewhere in the image: never this face's match
        # a neighbour overlapping this face less than its own detection (IoU about 0.3)
        near = good + np.array([0.45, 0, 0.45, 0]) * (good[2] - good[0])
        kind = i % 10
        if kind == 0:  # a miss: only boxes elsewhere
            dets = [far]
        elif kind == 1:  # a wild detection overlapping just enough to match (the median ignores it)
            dets = [far, gt + np.array([-0.3, -0.2, 0.5, 0.6]) * side]
            expect_matched += 1
        else:  # listed before the true detection, so taking the first overlapping box would be wrong
            dets = [far, near, good]
            expect_matched += 1
        detections.append(np.array(dets))
        gts.append(gt)
    fit = defaults.fit_box_adjust(detections, np.array(gts))
    assert fit["faces"] == 300 and fit["matched"] == expect_matched == 270
    got = fit["adjust"]
    for k in ("dx", "dy", "sw", "sh"):
        assert getattr(got, k) == pytest.approx(getattr(truth, k), abs=0.006), (k, got, truth)
    assert fit["iou_adjusted"] > 0.95 > fit["iou_raw"]


def test_fit_box_adjust_refuses_nothing_to_fit(defaults):
    with pytest.raises(ValueError, match="no detection overlaps"):
        defaults.fit_box_adjust([np.zeros((0, 4)), np.array([[500.0, 500, 600, 600]])],
                                np.array([[0.0, 0, 100, 100], [0.0, 0, 100, 100]]))
    with pytest.raises(ValueError, match="2 detection lists for 1 faces"):
        defaults.fit_box_adjust([np.zeros((0, 4))] * 2, np.array([[0.0, 0, 100, 100]]))


def test_every_kth_spans_the_list(defaults):
    assert defaults.every_kth(list(range(10)), None) == list(range(10))
    assert defaults.every_kth(list(range(10)), 4) == [0, 3, 6, 9]


def test_runtime_defaults_are_the_ones_the_benchmark_chose(tmp_path):
    """detectors.py's box corrections and every refine default equal benchmarks/results/defaults.json:
    after rerunning the benchmark (e.g. on a new shipped model), the code must be updated with it."""
    report = json.loads((REPO / "benchmarks" / "results" / "defaults.json").read_text())
    for name, cls in (("haar", HaarDetector), ("yunet", YuNetDetector)):
        assert BoxAdjust(**report["fit"][name]["refit"]) == cls.adjust, name
        assert report["choice"][name]["default"] == cls.default_refine, name
    # an app's boxes: count the model runs of one detect(image, boxes=...) with refine unset
    import onnxruntime as ort

    session = ort.InferenceSession(str(dot_finder_onnx(tmp_path / "dot.onnx")), providers=["CPUExecutionProvider"])
    runs = []

    class Counting:  # the real session, counting `run` calls
        def run(self, names, feeds):
            runs.append(1)
            return session.run(names, feeds)

        def __getattr__(self, name):
            return getattr(session, name)

    lm = FaceLandmarker.create(Counting(), FaceLandmarkerOptions(detector="none"))
    lm.detect(np.zeros((64, 64, 3), np.uint8), boxes=[[8, 8, 56, 56]])
    assert len(runs) == 1 + report["choice"]["caller-box"]["default"]
