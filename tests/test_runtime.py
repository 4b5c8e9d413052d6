"""flm.runtime: detectors, NMS, crops, batching, smoothing, tracking, pose, threads, torch-free import.

Every model here is a real ONNX file run by a real onnxruntime session: either a "dot
finder" whose right answer is known exactly (the centre of a bright blob), or a randomly
initialised flm preset exported the way `flm export` is specified to.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from flm.errors import FlmError, ModelFileError, SpecError, UsageError
from flm.geometry import REGION_COLORS_BGR, crop_matrix, landmark_box, transform_points
from flm.runtime import (BoxAdjust, FaceDetector, FaceLandmarker, FaceLandmarkerOptions, FaceTracker,
                         InvalidInputError, OneEuroFilter, annotate, box_iou, head_pose, make_detector, nms)
from flm.runtime.detectors import HaarDetector, calibrate_box_adjust
from flm.runtime.pose import MEAN_FACE_68, POSE_INDEX, POSE_MODEL, rotation_from_euler

from tests.helpers.runtime import HAAR_SEEDS, add_spec_metadata, blob_image, dot_finder_onnx, export_onnx, faces_image

REPO = Path(__file__).resolve().parents[1]
YUNET = REPO.parent / "shared" / "peers" / "yunet-n-320.onnx"

warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """ONNX files: dot finders (coords and heatmap layouts) and a random-init 68-point preset."""
    import torch

    from flm.pipeline.models import build_model

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = build_model("simple-cnn")
    hm = build_model("shufflenet-heatmap", img_size=64)
    return {
        "heatmap": export_onnx(hm, d / "hm.onnx"),
        "heatmap_raw": export_onnx(hm, d / "hm-raw.onnx", decode=False),
        "dot": dot_finder_onnx(d / "dot.onnx"),
        "dot_rgb_heatmap": dot_finder_onnx(d / "dot-hm.onnx", channels=3, heatmap=True),
        "face": export_onnx(net, d / "face68.onnx"),
        "face_batch1": export_onnx(net, d / "face68-b1.onnx", batch=1),
        "dir": d,
    }


class CountingSession:
    """A real onnxruntime session that counts `run` calls and the batch size of each."""

    def __init__(self, path):
        import onnxruntime as ort

        self._s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.batches: list[int] = []

    def run(self, names, feeds):
        self.batches.append(len(feeds["input"]))
        return self._s.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self._s, name)


# --------------------------------------------------------------------------- box maths


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.25])


def test_nms_suppresses_overlaps_and_orders_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0.5, 0, 10.5, 10]])
    scores = np.array([0.6, 0.9, 0.8, 0.7])
    keep = nms(boxes, scores, 0.4)
    assert keep.tolist() == [1, 2]  # 0 and 3 overlap the best box 1
    assert nms(boxes, scores, 1.0).tolist() == [1, 2, 3, 0]  # control: nothing suppressed
    assert nms(boxes, scores, 0.4, max_keep=1).tolist() == [1]
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_box_adjust_and_calibration_round_trip():
    adj = BoxAdjust(dx=0.05, dy=0.15, sw=0.85, sh=0.8)
    det = np.array([[10, 20, 110, 120], [200, 50, 260, 110], [5, 5, 45, 45.0]])
    assert calibrate_box_adjust(det, adj.apply(det)) == adj
    with pytest.raises(ValueError):
        calibrate_box_adjust(det, adj.apply(det)[:2])


def test_detector_takes_its_box_adjust_as_a_parameter():
    det = np.array([[10.0, 20, 110, 120]])
    rule = FaceLandmarkerOptions().crop  # unused by Haar's landmark_boxes
    default = HaarDetector()
    np.testing.assert_allclose(default.landmark_boxes(det, (200, 200, 3), rule), HaarDetector.adjust.apply(det))
    mine = BoxAdjust(dx=0.1, dy=-0.05, sw=0.5, sh=2.0)
    np.testing.assert_allclose(HaarDetector(adjust=mine).landmark_boxes(det, (200, 200, 3), rule),
                               [[45.0, -35.0, 95.0, 165.0]])
    assert HaarDetector().adjust == HaarDetector.adjust  # a per-instance adjust does not leak into the class
    with pytest.raises(UsageError, match="adjust must be a BoxAdjust"):
        HaarDetector(adjust=(0, 0.1, 1, 1))


def test_make_detector_errors():
    with pytest.raises(UsageError, match="unknown detector 'hog'"):
        make_detector("hog")
    with pytest.raises(UsageError, match="needs the path"):
        make_detector("yunet")
    with pytest.raises(ModelFileError, match="YuNet model file not found"):
        make_detector("yunet:/nonexistent/yunet.onnx")
    assert make_detector("none").name == "none"


# --------------------------------------------------------------------------- smoothing and tracking


def test_one_euro_constant_signal_stays_constant():
    f = OneEuroFilter(min_cutoff=1.0, beta=10.0)
    x = np.array([[12.5, 40.25], [3.0, -7.0]])
    for i in range(50):
        np.testing.assert_allclose(f(x, i / 30.0), x, atol=1e-12)


def test_one_euro_reduces_jitter_but_follows_motion():
    rng = np.random.default_rng(0)
    t = np.arange(300) / 30.0
    noise = rng.normal(0, 1.0, (300, 2))
    f = OneEuroFilter()  # the defaults the landmarker uses
    still = np.array([f(100 + n, ti, scale=100.0) for n, ti in zip(noise, t)])
    assert still[30:].std(axis=0).max() < 0.4 * noise[30:].std(axis=0).min()
    # a face moving at 3 face sizes per second: the speed-dependent cut-off keeps lag small
    f = OneEuroFilter(min_cutoff=1.0, beta=10.0)
    moving = 100 + 300.0 * t
    out = np.array([f(np.array([m]), ti, scale=100.0)[0] for m, ti in zip(moving, t)])
    lag = (moving - out)[60:].mean()
    slow = OneEuroFilter(min_cutoff=1.0, beta=0.0)  # control: without beta it lags much more
    out0 = np.array([slow(np.array([m]), ti, scale=100.0)[0] for m, ti in zip(moving, t)])
    assert 0 < lag < 0.3 * (moving - out0)[60:].mean()
    with pytest.raises(ValueError, match="time must increase"):
        f(np.array([1.0]), t[-1])


def test_tracker_keeps_ids_and_starts_and_ends_tracks():
    tr = FaceTracker(iou_threshold=0.3, max_missed=1)
    a, b = np.array([0, 0, 100, 100.0]), np.array([300, 0, 400, 100.0])
    pts = [np.zeros((68, 2)), np.ones((68, 2))]
    ids0, _ = tr.update([a, b], pts, 0.0)
    ids1, _ = tr.update([b + 5, a + 5], pts[::-1], 0.033)  # order swapped, both moved a little
    assert ids1 == ids0[::-1]
    far = np.array([600, 300, 700, 400.0])
    ids2, _ = tr.update([a + 8, far], pts, 0.066)
    assert ids2[0] == ids0[0] and ids2[1] not in ids0
    tr.update([a + 9], pts[:1], 0.1)
    tr.update([a + 9], pts[:1], 0.13)  # b unseen for 3 frames now: dropped
    ids5, _ = tr.update([b], pts[:1], 0.16)
    assert ids5[0] not in ids0 + ids2


# --------------------------------------------------------------------------- crops: box -> crop -> landmarks -> image


@pytest.mark.parametrize("centre,box,shape", [
    ((50.3, 40.7), (30, 20, 70, 60), (120, 160)),
    ((120.6, 33.2), (100, 10, 140, 60), (120, 160)),  # non-square box
    ((20.5, 90.25), (0, 70, 40, 100), (120, 160)),  # crop runs off the image
    ((400.0, 250.5), (300, 150, 500, 350), (480, 640)),  # large box: the crop shrinks the image
])
def test_crop_round_trip_returns_the_blob_centre(models, centre, box, shape):
    lm = FaceLandmarker.create(models["dot"], FaceLandmarkerOptions(refine=0))
    r = lm.detect(blob_image(*shape, centre, sigma=2.0 * max(1, (box[2] - box[0]) / 60)), boxes=[box])
    assert len(r.faces) == 1
    err = np.linalg.norm(r.faces[0].landmarks[0] - centre)
    assert err < 0.15, f"blob at {centre}, runtime says {r.faces[0].landmarks[0]}"
    # the same crop done by hand with the training-time functions agrees
    m = crop_matrix(box, lm.spec.crop, lm.spec.input_size)
    assert np.allclose(transform_points(np.array([centre]), m)[0], (lm.spec.input_size - 1) / 2, atol=40)


def test_heatmap_layout_is_decoded_with_confidence(models):
    lm = FaceLandmarker.create(models["dot_rgb_heatmap"], FaceLandmarkerOptions(refine=0, color="BGR"))
    assert lm.output_name == "heatmaps"
    r = lm.detect(blob_image(120, 160, (80.4, 60.6), color=True), boxes=[(60, 40, 100, 80)])
    assert np.linalg.norm(r.faces[0].landmarks[0] - (80.4, 60.6)) < 0.15
    assert r.faces[0].confidence is not None and 0 < r.faces[0].confidence[0] <= 1


def test_heatmap_model_decoded_in_graph_matches_numpy_decode(models):
    """A heatmap preset exported with and without in-graph decoding gives the same landmarks
    (numpy soft-argmax == the graph's), both with per-point confidence from the heatmaps."""
    bgr, pts = faces_image(1)
    box = [landmark_box(pts[0])]
    a = FaceLandmarker.create(models["heatmap"], FaceLandmarkerOptions(refine=1))
    b = FaceLandmarker.create(models["heatmap_raw"], FaceLandmarkerOptions(refine=1))
    assert (a.output_name, b.output_name) == ("landmarks", "heatmaps")
    fa, fb = a.detect(bgr, boxes=box).faces[0], b.detect(bgr, boxes=box).faces[0]
    np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=1e-3)
    np.testing.assert_allclose(fa.confidence, fb.confidence, atol=1e-4)
    assert fa.confidence.shape == (68,) and ((fa.confidence > 0) & (fa.confidence <= 1)).all()
    assert FaceLandmarker.create(models["face"]).detect(bgr, boxes=box).faces[0].confidence is None


def test_image_formats_agree(models, tmp_path):
    """BGR / RGB / gray / BGRA / float / path inputs of one picture give the same landmarks."""
    lm_bgr = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(refine=0))
    lm_rgb = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(refine=0, color="RGB"))
    bgr, pts = faces_image(1)
    box = [landmark_box(pts[0])]
    ref = lm_bgr.detect(bgr, boxes=box).faces[0].landmarks
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), bgr)
    variants = {
        "rgb": lm_rgb.detect(bgr[:, :, ::-1].copy(), boxes=box),
        "bgra": lm_bgr.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), boxes=box),
        "float": lm_bgr.detect(bgr.astype(np.float32) / 255.0, boxes=box),
        "path": lm_bgr.detect(str(path), boxes=box),
    }
    for name, r in variants.items():
        np.testing.assert_allclose(r.faces[0].landmarks, ref, atol=1e-3, err_msg=name)
    # the model is grayscale, so a gray image gives the same answer too (up to gray rounding)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.abs(lm_bgr.detect(gray, boxes=box).faces[0].landmarks - ref).max() < 1.0


def test_bad_images_raise_or_give_empty_results(models):
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(detector="none"))
    with pytest.raises(InvalidInputError, match="NaN"):
        lm.detect(np.full((64, 64, 3), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="shape"):
        lm.detect(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="shape"):
        lm.detect(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(InvalidInputError, match="numpy array or a path"):
        lm.detect([[1, 2], [3, 4]])
    assert isinstance(InvalidInputError("x"), ValueError) and isinstance(InvalidInputError("x"), FlmError)
    tiny = lm.detect(np.zeros((1, 1, 3), np.uint8))
    assert tiny is not None and tiny.faces == [] and len(tiny) == 0
    with pytest.raises(InvalidInputError, match="x1 > x0"):
        lm.detect(np.zeros((64, 64), np.uint8), boxes=[(10, 10, 5, 20)])
    with pytest.raises(InvalidInputError, match=r"\(M, 4\)"):
        lm.detect(np.zeros((64, 64), np.uint8), boxes=[(1, 2, 3)])


def test_no_face_gives_an_empty_result(models):
    lm = FaceLandmarker.create(models["face"])  # Haar
    rng = np.random.default_rng(3)
    r = lm.detect(np.clip(rng.normal(128, 5, (240, 320, 3)), 0, 255).astype(np.uint8))
    assert r is not None and r.faces == [] and not r and r.image_size == (320, 240)
    bgr, _ = faces_image(0)  # control: the same landmarker does find a drawn face
    assert len(lm.detect(bgr).faces) == 1


# --------------------------------------------------------------------------- batching, boxes, detectors


class ExplodingDetector(FaceDetector):
    name = "explodes"

    def _raw(self, rgb):
        raise AssertionError("the detector must not run when boxes are given")


def test_boxes_skip_the_detector(models):
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(detector=ExplodingDetector()))
    bgr, pts = faces_image(2, n=2)
    r = lm.detect(bgr, boxes=[landmark_box(p) for p in pts])
    assert len(r.faces) == 2 and all(f.score == 1.0 for f in r.faces)
    with pytest.raises(AssertionError, match="must not run"):  # control: without boxes it does run
        lm.detect(bgr)


def test_all_faces_go_through_one_batched_run(models):
    bgr, pts = faces_image(4, n=4, size=(300, 1000))
    boxes = [landmark_box(p) + d for p in pts for d in (0, 3)]  # 8 boxes
    session = CountingSession(models["face"])
    lm = FaceLandmarker.create(session, FaceLandmarkerOptions(refine=1, max_faces=8))
    batched = lm.detect(bgr, boxes=boxes)
    assert session.batches == [8, 8]  # one run per pass, every face in it
    singles = [lm.detect(bgr, boxes=[b]).faces[0].landmarks for b in boxes]
    for face, single in zip(batched.faces, singles):
        np.testing.assert_allclose(face.landmarks, single, atol=1e-3)
    # a model exported with a fixed batch of 1 still works (one run per face) with equal results
    s1 = CountingSession(models["face_batch1"])
    r1 = FaceLandmarker.create(s1, FaceLandmarkerOptions(refine=1, max_faces=8)).detect(bgr, boxes=boxes)
    assert s1.batches == [1] * 16
    for a, b in zip(r1.faces, batched.faces):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


def test_max_faces_keeps_the_best(models):
    bgr, pts = faces_image(5, n=3, size=(300, 900))
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(max_faces=2))
    assert len(lm.detect(bgr, boxes=[landmark_box(p) for p in pts]).faces) == 2


def test_haar_finds_generated_faces_and_its_adjust_fits():
    det = HaarDetector()
    bgr, pts = faces_image(0, n=2, size=(360, 720))
    boxes, scores = det.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert len(boxes) == 2 and (scores > 0).all()
    gt = np.stack([landmark_box(p) for p in pts])
    assert box_iou(boxes, gt).max(axis=1).min() > 0.3


@pytest.mark.skipif(not YUNET.is_file(), reason=f"YuNet peer model not present at {YUNET}")
def test_yunet_detector_finds_generated_faces(models):
    bgr, pts = faces_image(0, n=2, size=(360, 720))
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(detector=f"yunet:{YUNET}", refine=0))
    r = lm.detect(bgr)
    assert len(r.faces) == 2
    gt = np.stack([landmark_box(p) for p in pts])
    assert box_iou(np.stack([f.detection_box for f in r.faces]), gt).max(axis=1).min() > 0.3
    assert lm.detect(np.full((240, 320, 3), 127, np.uint8)).faces == []


# --------------------------------------------------------------------------- model files


def test_model_files_without_a_valid_spec_are_refused(models, tmp_path):
    import shutil

    bare = shutil.copy(models["face"], tmp_path / "bare.onnx")
    add_spec_metadata(bare, None)
    with pytest.raises(ModelFileError, match=r"bare\.onnx.*no flm spec"):
        FaceLandmarker.create(bare)
    broken = shutil.copy(models["face"], tmp_path / "broken.onnx")
    add_spec_metadata(broken, '{"format": "flm-spec/1", "preset": "x"')
    with pytest.raises(SpecError, match=r"broken\.onnx.*not valid JSON"):
        FaceLandmarker.create(broken)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file at all")
    with pytest.raises(ModelFileError, match=r"junk\.onnx.*cannot load"):
        FaceLandmarker.create(junk)
    with pytest.raises(ModelFileError, match="model file not found"):
        FaceLandmarker.create(tmp_path / "missing.onnx")
    # a spec that disagrees with the graph (68-point file claiming 98 points) is refused too
    wrong = shutil.copy(models["face"], tmp_path / "wrong.onnx")
    spec = json.loads(FaceLandmarker.create(models["face"]).spec.to_json())
    spec.update(num_points=98, scheme="wflw98")
    add_spec_metadata(wrong, json.dumps(spec))
    with pytest.raises(ModelFileError, match="98"):
        FaceLandmarker.create(wrong)


def test_default_model_missing_is_a_clear_error():
    from flm.runtime.landmarker import DEFAULT_MODEL

    if DEFAULT_MODEL.is_file():
        assert FaceLandmarker.create().spec.num_points == 68
    else:
        with pytest.raises(ModelFileError, match="default model is not bundled"):
            FaceLandmarker.create()


def test_options_are_validated(models):
    with pytest.raises(UsageError, match="color"):
        FaceLandmarker.create(models["face"], FaceLandmarkerOptions(color="YUV"))
    with pytest.raises(UsageError, match="provider"):
        FaceLandmarker.create(models["face"], FaceLandmarkerOptions(providers=("NoSuchExecutionProvider",)))
    with pytest.raises(UsageError, match="max_faces"):
        FaceLandmarker.create(models["face"], FaceLandmarkerOptions(max_faces=0))


# --------------------------------------------------------------------------- threads, video


def test_one_landmarker_from_eight_threads_matches_sequential(models):
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(threads=1))
    images = [faces_image(seed)[0] for seed in HAAR_SEEDS]
    expected = [lm.detect(img) for img in images]
    assert all(len(r.faces) == 1 for r in expected)
    got: dict[int, object] = {}
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for _ in range(3):
            got[i] = lm.detect(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_allclose(got[i].faces[0].landmarks, expected[i].faces[0].landmarks, atol=1e-6)
    # control: the eight images really give different landmarks
    assert np.abs(expected[0].faces[0].landmarks - expected[1].faces[0].landmarks).max() > 1.0


def test_video_mode_smooths_a_jittering_still_point(models):
    rng = np.random.default_rng(0)
    lm = FaceLandmarker.create(models["dot"], FaceLandmarkerOptions(detector="none", refine=0))
    raw, smooth, ids = [], [], set()
    for i in range(60):
        c = (64.0 + rng.normal(0, 0.8), 64.0 + rng.normal(0, 0.8))
        img = blob_image(128, 128, c, sigma=4.0)
        raw.append(lm.detect(img).faces[0].landmarks[0])
        face = lm.detect_for_video(img, i * 33.3).faces[0]
        smooth.append(face.landmarks[0])
        ids.add(face.track_id)
    raw, smooth = np.array(raw)[10:], np.array(smooth)[10:]
    assert ids == {0}
    assert smooth.std(axis=0).max() < 0.5 * raw.std(axis=0).min()
    with pytest.raises(InvalidInputError, match="increase"):
        lm.detect_for_video(img, 10.0)
    lm.reset_video()
    assert lm.detect_for_video(img, 0.0).faces[0].track_id == 0


# --------------------------------------------------------------------------- pose and drawing


def _face_with_pose(yaw, pitch, roll, shape=(480, 640)):
    r = rotation_from_euler(yaw, pitch, roll)
    t = np.array([10.0, -5.0, 600.0])
    cam = np.array([[640, 0, 319.5], [0, 640, 239.5], [0, 0, 1.0]])
    p3 = POSE_MODEL @ r.T + t
    proj = p3 @ cam.T
    pts = np.full((68, 2), 300.0)
    pts[POSE_INDEX] = proj[:, :2] / proj[:, 2:]
    return pts


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (25, 0, 0), (-30, 10, 0), (10, -15, 20), (0, 0, -35)])
def test_head_pose_recovers_known_angles(yaw, pitch, roll):
    pose = head_pose(_face_with_pose(yaw, pitch, roll), (480, 640))
    assert pose is not None
    np.testing.assert_allclose(tuple(pose), (yaw, pitch, roll), atol=1.0)


def test_head_pose_signs_match_the_image():
    nose, eyes = POSE_INDEX.tolist().index(30), [POSE_INDEX.tolist().index(i) for i in (36, 45)]
    for yaw, pitch, axis, sign in ((30, 0, 0, 1), (0, 20, 1, -1), (-30, 0, 0, -1)):
        pts = _face_with_pose(yaw, pitch, 0)[POSE_INDEX]
        centre = pts[eyes].mean(axis=0)
        front = _face_with_pose(0, 0, 0)[POSE_INDEX]
        # nose relative to the eyes moves right for yaw > 0 and up (y decreases) for pitch > 0
        moved = (pts[nose] - centre)[axis] - (front[nose] - front[eyes].mean(axis=0))[axis]
        assert np.sign(moved) == sign
    roll_pts = _face_with_pose(0, 0, 20)
    d = roll_pts[45] - roll_pts[36]
    assert d[1] < 0  # counter-clockwise on screen: the right eye rises
    assert len(MEAN_FACE_68) >= 6


def test_annotate_draws_regions_and_sunglasses(models):
    bgr, pts = faces_image(0)
    lm = FaceLandmarker.create(models["face"], FaceLandmarkerOptions(refine=0))
    r = lm.detect(bgr, boxes=[landmark_box(pts[0])])
    r.faces[0].landmarks = pts[0].astype(np.float64)  # draw the true points, so colours land on them
    drawn = annotate(bgr, r, boxes=False, pose=False)
    assert not np.array_equal(drawn, bgr) and np.array_equal(bgr, faces_image(0)[0])  # a copy
    for idx, region in ((8, "jaw"), (30, "nose"), (57, "mouth")):
        x, y = np.round(pts[0][idx]).astype(int)
        assert tuple(drawn[y, x]) == REGION_COLORS_BGR[region]
    glasses = annotate(bgr, r, boxes=False, pose=False, points=False, sunglasses=True)
    for eye in (pts[0][36:42], pts[0][42:48]):
        (x0, y0), (x1, y1) = np.floor(eye.min(axis=0)).astype(int), np.ceil(eye.max(axis=0)).astype(int)
        assert glasses[y0:y1, x0:x1].mean() < 60 < bgr[y0:y1, x0:x1].mean()  # lenses cover the eyes
    cheek = np.round(pts[0][3] * 0.5 + pts[0][31] * 0.5).astype(int)
    assert np.array_equal(glasses[cheek[1], cheek[0]], bgr[cheek[1], cheek[0]])  # cheeks untouched


def test_pose_on_real_runs_is_attached_for_68_points(models):
    lm = FaceLandmarker.create(models["face"])
    bgr, _ = faces_image(0)
    face = lm.detect(bgr).faces[0]
    assert face.pose is not None and all(math.isfinite(v) for v in face.pose)
    d = face.to_dict()
    assert set(d) >= {"box", "score", "landmarks", "pose"} and len(d["landmarks"]) == 68


# --------------------------------------------------------------------------- torch-free


def test_runtime_runs_without_torch_in_a_fresh_interpreter(models):
    code = f"""
import sys
sys.modules['torch'] = None  # importing torch now raises ImportError
for name in ('onnx', 'coremltools'):
    sys.modules[name] = None
import numpy as np
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
from tests.helpers.runtime import blob_image
lm = FaceLandmarker.create({str(models['dot'])!r}, FaceLandmarkerOptions(detector='none', refine=0))
r = lm.detect(blob_image(64, 64, (30.5, 33.25)))
assert abs(r.faces[0].landmarks[0][0] - 30.5) < 0.2, r.faces[0].landmarks
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'coremltools', 'torchvision')
                and sys.modules[m] is not None)
print('LOADED', loaded)
"""
    # the repo root on the path (not only as the working folder) so `tests.helpers` imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "LOADED []" in p.stdout


# --------------------------------------------------------------------------- the lean per-face path


def _model_input_formula(crop, channels, mean, std):
    """The crop -> model input arithmetic written out on (H, W, C) pixels, as flm first defined it."""
    x = crop.astype(np.float32) / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    if channels == 1 and x.shape[2] == 3:
        x = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY).astype(np.float32)[:, :, None] / 255.0
    elif channels == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.mark.parametrize("shape, channels, flip", [((48, 40, 3), 3, False), ((48, 40, 3), 3, True),
                                                   ((48, 40, 3), 1, False), ((48, 40), 3, False),
                                                   ((48, 40, 1), 3, False), ((48, 40), 1, False)])
def test_to_model_input_into_a_batch_row_is_the_formula_bit_for_bit(shape, channels, flip):
    """The runtime writes each crop straight into its batch (`out=`); evaluation and parity let
    `to_model_input` allocate. Both give the plain float32 formula's values, bit for bit."""
    from flm.geometry import to_model_input

    rng = np.random.default_rng(len(shape) * 10 + channels + flip)
    crop = rng.integers(0, 256, shape, dtype=np.uint8)
    crop.flat[:4] = [0, 1, 254, 255]  # the extremes too
    if flip:
        crop = crop[:, :, ::-1]  # a BGR model's view of an RGB crop: negative strides
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.5,), (0.25,))
    want = _model_input_formula(crop, channels, mean, std)
    batch = np.full((2, channels, *shape[:2]), np.nan, np.float32)
    got = to_model_input(crop, channels, np.asarray(mean, np.float32).reshape(-1, 1, 1),
                         np.asarray(std, np.float32).reshape(-1, 1, 1), out=batch[1])
    assert np.shares_memory(got, batch[1])
    assert np.isnan(batch[0]).all()
    fresh = to_model_input(crop, channels, mean, std)
    for x in (batch[1], fresh):
        assert x.dtype == want.dtype and x.shape == want.shape and x.flags.c_contiguous
        assert np.array_equal(x, want)


def test_heatmap_confidence_leaves_its_input_alone():
    from flm.runtime.landmarker import heatmap_confidence

    logits = np.random.default_rng(0).normal(0, 4, (2, 5, 6, 6)).astype(np.float32)
    before = logits.copy()
    conf = heatmap_confidence(logits)
    assert np.array_equal(logits, before) and conf.dtype == np.float64 and conf.shape == (2, 5)
    z = logits.reshape(2, 5, -1).astype(np.float64)
    assert np.array_equal(conf, 1.0 / np.exp(z - z.max(axis=2, keepdims=True)).sum(axis=2))
    flat = heatmap_confidence(np.zeros((1, 1, 4, 4)))
    assert flat[0, 0] == pytest.approx(1 / 16)


class RecordingHaar(HaarDetector):
    """OpenCV's Haar detector that keeps each image it was given."""

    def __init__(self):
        super().__init__(min_size=20)
        self.seen: list[np.ndarray] = []

    def _raw(self, rgb):
        self.seen.append(rgb.copy())
        return super()._raw(rgb)


@pytest.mark.parametrize("model", ["face", "heatmap"])
def test_a_bgr_array_is_cropped_as_given_with_the_same_results_as_rgb(models, model):
    """A BGR uint8 image is not converted as a whole for the model's crops (only for a detector,
    which gets RGB): the landmarks, confidence and pose are those of the same image given as RGB,
    and of the general conversion path (a non-contiguous view, a BGRA image)."""
    bgr, pts = faces_image(1, n=2)
    boxes = np.stack([landmark_box(p) for p in pts])
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    wide = np.zeros((bgr.shape[0], bgr.shape[1] * 2, 3), np.uint8)
    wide[:, ::2] = bgr
    views = {"bgr": (bgr, "BGR"), "rgb": (rgb, "RGB"), "bgra": (bgra, "BGR"), "strided": (wide[:, ::2], "BGR")}
    results = {}
    for name, (img, color) in views.items():
        det = RecordingHaar()
        lm = FaceLandmarker.create(models[model], FaceLandmarkerOptions(color=color, detector=det, refine=1))
        results[name] = (lm.detect(img, boxes=boxes), lm.detect(img))
        assert len(det.seen) == 1 and np.array_equal(det.seen[0], rgb), name  # the detector always sees RGB
    ref_boxes, ref_det = results["rgb"]
    assert len(ref_boxes.faces) == 2 and len(ref_det.faces) >= 1
    for name, (by_box, by_det) in results.items():
        for got, want in ((by_box, ref_boxes), (by_det, ref_det)):
            assert len(got.faces) == len(want.faces), name
            for a, b in zip(got.faces, want.faces):
                assert np.array_equal(a.landmarks, b.landmarks) and np.array_equal(a.box, b.box), name
                assert (a.confidence is None) == (b.confidence is None), name
                assert a.confidence is None or np.array_equal(a.confidence, b.confidence), name
                assert (a.pose is None and b.pose is None) or tuple(a.pose) == tuple(b.pose), name
    if model == "heatmap":  # the heatmaps' per-point confidence came through the same path
        assert results["bgr"][0].faces[0].confidence is not None


def test_landmarks_for_boxes_still_takes_an_rgb_array(models):
    bgr, pts = faces_image(2)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    lm = FaceLandmarker.create(models["heatmap"], FaceLandmarkerOptions(detector="none", pose=False))
    box = landmark_box(pts[0])
    p, conf = lm.landmarks_for_boxes(rgb, box[None])
    r = lm.detect(rgb[:, :, ::-1].copy(), boxes=[box])  # color="BGR" by default
    assert np.array_equal(p[0], r.faces[0].landmarks) and np.array_equal(conf[0], r.faces[0].confidence)
