"""benchmarks/accuracy.py: its NME by face region, on generated faces answered by a system whose
error is known (the truth with only the jaw moved), so a region mixed up with another fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from flm.geometry import landmark_box, normaliser
from flm.pipeline.data import open_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, str(REPO / "benchmarks"))  # accuracy.py imports its neighbour speed.py
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "benchmarks" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class JawOff:
    """Answers each face with its true points, the 17 jaw points moved 3 px to the right."""

    name = "jaw off"

    def __init__(self, ds):
        self.truth = {tuple(landmark_box(s.points)): s.points for s in ds.samples}

    def __call__(self, rgb, box):
        pts = np.array(self.truth[tuple(box)], np.float64)
        pts[:17, 0] += 3
        return pts


def test_the_error_is_split_by_face_region(accuracy):
    ds = open_dataset("synthetic:6")
    res = accuracy.run([JawOff(ds)], ds, "gt-box", "inter-ocular")["jaw off"]
    gt = np.stack([s.points for s in ds.samples]).astype(np.float64)
    jaw = float(np.mean(3 / normaliser(gt, "inter-ocular", "ibug68")))
    assert res["regions"]["jaw"] == pytest.approx(jaw)
    assert all(v == pytest.approx(0, abs=1e-12) for k, v in res["regions"].items() if k != "jaw")
    assert res["nme_mean"] == pytest.approx(jaw * 17 / 68)
    cols, rows = accuracy.region_rows({"jaw off": res})
    assert cols == ["system", "jaw", "brows", "nose", "eyes", "mouth", "all"]
    assert rows[0][1] == f"{100 * jaw:.2f} %" and rows[0][2] == "0.00 %"
