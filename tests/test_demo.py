"""`just demo`'s last steps: `flm sample-photos` writes real public-domain photos (NASA's
astronaut portrait from scikit-image's wheel), and `flm detect` with its defaults - OpenCV's Haar
detector and the model flm ships, run by onnxruntime - finds, landmarks and annotates the face.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from flm.cli import main as cli_main
from flm.runtime import FaceLandmarker, annotate

from flm.runtime.samples import TILT_DEGREES, astronaut_rgb
from flm.runtime.shipped import DEFAULT_NAME

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image (the demo extra, pip install 'flm[demo]') is not installed")

REPO = Path(__file__).resolve().parents[1]
# Located by eye on the 512 x 512 portrait (image x, y): the centres of the eye on the image's
# left and on its right, the nose tip and the centre of the mouth.
ASTRONAUT = {"left eye": (204, 103), "right eye": (248, 104), "nose tip": (226, 131), "mouth": (224, 145)}
TOLERANCE_PX = 8  # ~1/5 of the 44 px between the eyes


def _parts(landmarks) -> dict[str, np.ndarray]:
    p = np.asarray(landmarks)
    return {"left eye": p[36:42].mean(axis=0), "right eye": p[42:48].mean(axis=0), "nose tip": p[30],
            "mouth": p[48:60].mean(axis=0)}


def _tilted_truth() -> dict[str, np.ndarray]:
    """ASTRONAUT moved as `sample_photos` moves the second photo: mirrored, then turned."""
    turn = cv2.getRotationMatrix2D((256, 256), TILT_DEGREES, 1.0)
    moved = {k: turn @ np.array([511 - x, y, 1.0]) for k, (x, y) in ASTRONAUT.items()}
    # mirroring swaps which eye is on the image's left
    return {**moved, "left eye": moved["right eye"], "right eye": moved["left eye"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's last two commands, as the Justfile runs them (torch is not needed)."""
    d = tmp_path_factory.mktemp("demo")
    assert cli_main(["sample-photos", "--out", str(d / "photos")]) == 0
    assert cli_main(["detect", str(d / "photos"), "--out", str(d / "detections-real"),
                     "--json", str(d / "faces.json")]) == 0
    return d


@needs_skimage
def test_sample_photos_are_the_astronaut_portrait(demo):
    photos = sorted((demo / "photos").iterdir())
    assert [p.name for p in photos] == ["astronaut-mirrored-tilted.jpg", "astronaut.jpg"]
    shipped = astronaut_rgb()
    first = cv2.cvtColor(cv2.imread(str(demo / "photos" / "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    assert first.shape == shipped.shape == (512, 512, 3)
    assert np.abs(first.astype(int) - shipped).mean() < 3  # JPEG at quality 95
    tilted = cv2.cvtColor(cv2.imread(str(demo / "photos" / "astronaut-mirrored-tilted.jpg")), cv2.COLOR_BGR2RGB)
    assert np.abs(tilted.astype(int) - shipped).mean() > 20  # a different picture, not a copy


@needs_skimage
def test_flm_detect_finds_and_landmarks_the_real_face(demo):
    doc = json.loads((demo / "faces.json").read_text())
    assert doc["detector"] == "haar" and doc["model"].endswith(f"{DEFAULT_NAME}.onnx") and doc["spec"]["num_points"] == 68
    files = {Path(f["path"]).name: f for f in doc["files"]}
    for name, truth in (("astronaut.jpg", {k: np.array(v) for k, v in ASTRONAUT.items()}),
                        ("astronaut-mirrored-tilted.jpg", _tilted_truth())):
        faces = files[name]["faces"]
        assert len(faces) == 1, name
        face = faces[0]
        pts = np.array(face["landmarks"])
        assert pts.shape == (68, 2) and np.isfinite(pts).all()
        # every point inside the detector's face box, grown by a quarter (Haar's box stops above the chin)
        x0, y0, x1, y1 = face["detection_box"]
        gx, gy = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
        assert (pts[:, 0] >= x0 - gx).all() and (pts[:, 0] <= x1 + gx).all(), (name, face["detection_box"])
        assert (pts[:, 1] >= y0 - gy).all() and (pts[:, 1] <= y1 + gy).all(), (name, face["detection_box"])
        for part, where in _parts(pts).items():
            assert np.hypot(*(where - truth[part])) < TOLERANCE_PX, (name, part, where, truth[part])
        assert set(face["pose"]) >= {"yaw", "pitch", "roll"}
    # the second photo is the first mirrored and turned by TILT_DEGREES: the head's roll follows
    roll = [files[n]["faces"][0]["pose"]["roll"] for n in ("astronaut.jpg", "astronaut-mirrored-tilted.jpg")]
    assert abs((roll[1] + roll[0]) - TILT_DEGREES) < 5, roll  # mirroring negates roll, the turn adds to it


@needs_skimage
def test_annotated_photos_show_landmarks_box_and_pose_axes(demo):
    photo = cv2.imread(str(demo / "photos" / "astronaut.jpg"))
    drawn = cv2.imread(str(demo / "detections-real" / "astronaut.jpg"))
    assert drawn.shape == photo.shape
    diff = np.abs(drawn.astype(int) - photo).max(axis=2) > 60
    assert diff[60:200, 160:300].mean() > 0.02  # drawing on the face
    assert diff[300:, :].mean() < 0.001  # and nowhere else (the spacesuit below it)
    # each of the three things annotate draws, alone, on the same result
    face_only = FaceLandmarker.create().detect(photo)
    assert len(face_only.faces) == 1
    for what, colour in (("boxes", (0, 255, 0)), ("pose", (0, 0, 255)), ("pose", (255, 0, 0)), ("points", None)):
        only = annotate(photo, face_only, points=what == "points", boxes=what == "boxes", pose=what == "pose")
        changed = (only != photo).any(axis=2)
        assert changed.sum() > 50, what
        if colour is not None:  # the box is green, the pose's x axis red and its z axis blue (BGR, anti-aliased)
            near = np.abs(only[changed].astype(int) - colour).max(axis=1) < 80
            assert near.sum() > 10, (what, colour)


def test_runtime_and_detect_do_not_import_scikit_image():
    code = ("import sys\nimport flm.runtime, flm.runtime.commands, flm.cli\n"
            "print('SKIMAGE', 'skimage' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "SKIMAGE False" in p.stdout


def test_sample_photos_without_scikit_image_names_the_extra(tmp_path):
    code = ("import sys\nsys.modules['skimage'] = None  # importing it now raises ImportError\n"
            "from flm.cli import main\n"
            f"sys.exit(main(['sample-photos', '--out', {str(tmp_path / 'photos')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "scikit-image" in p.stderr and "pip install 'flm[demo]'" in p.stderr and "example:" in p.stderr
    assert not (tmp_path / "photos").exists() or not any((tmp_path / "photos").iterdir())
