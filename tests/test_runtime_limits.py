"""How many faces, and how small: the `max_faces` cap says what it dropped, and the smallest face
kept scales with the image (`FaceLandmarkerOptions.min_face_size`).

The crowds here are real faces: tiles of NASA's public-domain astronaut portrait (from
scikit-image's wheel, the demo extra), found by the real OpenCV Haar detector and landmarked by
the model flm ships, with a real onnxruntime.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from flm.cli import main as cli_main
from flm.errors import UsageError
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
from flm.runtime.landmarker import MIN_FACE_FLOOR, MIN_FACE_FRACTION, min_face_side

pytest.importorskip("skimage", reason="scikit-image (the demo extra, pip install 'flm[demo]') is not installed: "
                                      "the test crowds are tiles of its astronaut photo")
from flm.runtime.samples import astronaut_rgb  # noqa: E402


def crowd(tile: int, rows: int, cols: int) -> np.ndarray:
    """RGB image: rows x cols copies of the astronaut's head, each `tile` px square (Haar's box is
    ~0.4 of it). (Faces are tiled edge to edge: on a large plain background OpenCV's histogram
    equalisation before Haar washes small faces out.)"""
    head = astronaut_rgb()[20:280, 90:350]  # 260 x 260: hair, face and collar
    return np.tile(cv2.resize(head, (tile, tile), interpolation=cv2.INTER_AREA), (rows, cols, 1))


@pytest.fixture(scope="module")
def group():
    """A 'group photo' of 24 real faces of ~45 px (every one above the old fixed 40 px minimum)."""
    return crowd(110, 4, 6)


def test_the_cap_reports_the_faces_it_dropped(group):
    every = FaceLandmarker.create(options=FaceLandmarkerOptions(max_faces=64, refine=0, color="RGB")).detect(group)
    assert len(every.faces) >= 20 and every.dropped == 0  # control: Haar finds (nearly) all 24
    capped = FaceLandmarker.create(options=FaceLandmarkerOptions(max_faces=8, refine=0, color="RGB")).detect(group)
    assert len(capped.faces) == 8
    assert capped.dropped == len(every.faces) - 8 and capped.found == len(every.faces)
    assert capped.to_dict()["dropped"] == capped.dropped
    # the 8 kept are the 8 best-scored of all
    np.testing.assert_allclose([f.score for f in capped.faces], [f.score for f in every.faces[:8]])
    # app boxes beyond the cap are counted too
    boxes = [f.detection_box for f in every.faces[:5]]
    lm = FaceLandmarker.create(options=FaceLandmarkerOptions(max_faces=3, refine=0, color="RGB"))
    r = lm.detect(group, boxes=boxes)
    assert (len(r.faces), r.dropped) == (3, 2)
    assert lm.detect(group, boxes=boxes[:3]).dropped == 0


def test_flm_detect_warns_when_the_cap_dropped_faces(group, tmp_path, capsys):
    photo = tmp_path / "group.png"
    cv2.imwrite(str(photo), cv2.cvtColor(group, cv2.COLOR_RGB2BGR))
    assert cli_main(["detect", str(photo), "--json", str(tmp_path / "faces.json")]) == 0  # default --max-faces 8
    record = json.loads((tmp_path / "faces.json").read_text())["files"][0]
    found = len(record["faces"]) + record["dropped"]
    assert len(record["faces"]) == 8 and found >= 20
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, captured.err
    assert f"{found} faces found" in warning[0] and f"--max-faces {found}" in warning[0] and "group.png" in warning[0]
    assert f"8 of {found}" in captured.out  # the table says it too
    # raising the cap as the warning says: every face, no warning
    assert cli_main(["detect", str(photo), "--max-faces", str(found), "--json", str(tmp_path / "all.json")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "all.json").read_text())["files"][0]["dropped"] == 0


def test_min_face_size_rule():
    assert (MIN_FACE_FRACTION, MIN_FACE_FLOOR) == (1 / 40, 20)
    assert min_face_side(None, (480, 640, 3)) == 20  # the floor: 480 / 40 = 12
    assert min_face_side(None, (800, 1200)) == 20
    assert min_face_side(None, (1080, 1920, 3)) == 27
    assert min_face_side(None, (4032, 3024)) == pytest.approx(75.6)  # the shorter side, either way round
    assert min_face_side(None, (3024, 4032)) == pytest.approx(75.6)
    assert min_face_side(40, (4032, 3024)) == 40 and min_face_side(12, (480, 640)) == 12  # as given
    assert FaceLandmarkerOptions().min_face_size is None
    for bad in (0, -5, 2.5, "40", True):
        with pytest.raises(UsageError, match="min_face_size"):
            FaceLandmarkerOptions(min_face_size=bad).validate()


def test_small_faces_are_found_by_default_and_the_minimum_scales_with_the_image():
    small = crowd(60, 3, 4)  # 12 faces of ~25 px (Haar boxes) in a 180 x 240 image
    default = FaceLandmarkerOptions(refine=0, max_faces=64, color="RGB")
    found = FaceLandmarker.create(options=default).detect(small)
    assert len(found.faces) >= 10
    assert all(min(f.detection_box[2:] - f.detection_box[:2]) < 40 for f in found.faces)
    old = FaceLandmarkerOptions(refine=0, max_faces=64, color="RGB", min_face_size=40)  # the old default
    assert len(FaceLandmarker.create(options=old).detect(small).faces) == 0
    # the same faces filling a 1200 x 1200 picture are under 1/40 of it (30 px): not kept by default...
    big = crowd(60, 20, 20)
    r = FaceLandmarker.create(options=FaceLandmarkerOptions(refine=0, max_faces=16, color="RGB")).detect(big)
    assert (len(r.faces), r.dropped) == (0, 0)
    # ...but are with an explicit minimum
    explicit = FaceLandmarkerOptions(refine=0, max_faces=16, color="RGB", min_face_size=20)
    r = FaceLandmarker.create(options=explicit).detect(big)
    assert len(r.faces) == 16 and r.found >= 300


def test_flm_detect_min_face_option(tmp_path, capsys):
    photo = tmp_path / "small.png"
    cv2.imwrite(str(photo), cv2.cvtColor(crowd(60, 3, 4), cv2.COLOR_RGB2BGR))
    assert cli_main(["detect", str(photo), "--max-faces", "64", "--json", str(tmp_path / "a.json")]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["min_face_size"] is None and len(doc["files"][0]["faces"]) >= 10
    assert cli_main(["detect", str(photo), "--min-face", "40", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["files"][0]["faces"] == []
    assert cli_main(["detect", str(photo), "--min-face", "0"]) == 2
    assert "--min-face must be a whole number of at least 1, got 0" in capsys.readouterr().err
