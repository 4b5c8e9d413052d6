"""Video mode: faces followed from their own landmarks, the detector only when needed, track ids,
smoothing, bad input, and `flm detect` on clips.

The faces are real: NASA's public-domain astronaut portrait (scikit-image's wheel, the demo
extra) pasted into frames, found by the real OpenCV Haar detector (wrapped to count its calls)
and landmarked by the model flm ships, with a real onnxruntime.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from flm.cli import main as cli_main
from flm.errors import UsageError
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions, HaarDetector, InvalidInputError, OneEuroFilter
from flm.runtime.tracking import LandmarkTracker, nearest, track_quality

pytest.importorskip("skimage", reason="scikit-image (the demo extra, pip install 'flm[demo]') is not installed: "
                                      "the test faces are its astronaut photo")
from flm.runtime.samples import astronaut_rgb  # noqa: E402

TILE = 180  # the head's side in the frame: Haar finds its ~60 px face anywhere in a 480x360 frame
FRAME = (360, 480)
MS = 1000.0 / 30  # 30 frames a second


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    return cv2.resize(astronaut_rgb()[20:260, 100:340], (TILE, TILE), interpolation=cv2.INTER_AREA)


def scene(head, corners, seed: int = 0, size=FRAME) -> np.ndarray:
    """RGB frame: grey with sensor noise, the head pasted with its top-left corner at each (x, y)
    (clipped at the frame's edges)."""
    rng = np.random.default_rng(seed)
    frame = np.full((*size, 3), 120.0)
    for x, y in corners:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + TILE, size[1]), min(y + TILE, size[0])
        if x1 > x0 and y1 > y0:
            frame[y0:y1, x0:x1] = head[y0 - y:y1 - y, x0 - x:x1 - x]
    return np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)


class CountingHaar(HaarDetector):
    """The real Haar detector, counting the frames it looks at."""

    calls = 0

    def detect(self, rgb):
        self.calls += 1
        return super().detect(rgb)


def video_landmarker(**options) -> tuple[FaceLandmarker, CountingHaar]:
    haar = CountingHaar(min_size=20)
    lm = FaceLandmarker.create(options=FaceLandmarkerOptions(detector=haar, threads=1, color="RGB", **options))
    return lm, haar


def centre(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


# --------------------------------------------------------------------------- the detector only when needed


def test_a_tracked_face_is_not_redetected_while_healthy(head):
    lm, haar = video_landmarker()
    ids, offsets = set(), []
    for i in range(20):  # 0.63 s, less than redetect_interval_ms: the first frame's detection only
        corner = np.array([100 + 4 * i, 80 + 2 * i])  # 1.7 face widths a second
        faces = lm.detect_for_video(scene(head, [corner], seed=i), i * MS).faces
        assert len(faces) == 1, f"frame {i}"
        ids.add(faces[0].track_id)
        offsets.append(centre(faces[0].box) - corner)
    assert haar.calls == 1 and ids == {0}
    # the landmarks moved with the face: their box keeps its place on the head, within 2 % of its
    # size once the track's velocity is known (a few frames), 6 % before
    side, moved = faces[0].box[2] - faces[0].box[0], np.abs(np.array(offsets) - offsets[0])
    assert moved[5:].max() < 0.02 * side and moved.max() < 0.06 * side
    control, control_haar = video_landmarker(tracking=False)
    for i in range(5):
        control.detect_for_video(scene(head, [(100, 80)], seed=i), i * MS)
    assert control_haar.calls == 5  # tracking off: the detector on every frame


def test_the_detector_runs_every_interval_while_fewer_than_max_faces_are_tracked(head):
    lm, haar = video_landmarker(redetect_interval_ms=300)
    ran = [lm.detect_for_video(scene(head, [(100, 80)], seed=i), i * MS).detector_ran for i in range(30)]
    assert np.flatnonzero(ran).tolist() == [0, 9, 18, 27]  # every 300 ms of stream time: frames 9 * 33.3 ms apart
    assert haar.calls == 4
    one, one_haar = video_landmarker(redetect_interval_ms=300, max_faces=1)
    for i in range(30):
        one.detect_for_video(scene(head, [(100, 80)], seed=i), i * MS)
    assert one_haar.calls == 1  # every face it may report is tracked: no need to look for more


def test_a_new_face_is_picked_up_within_the_interval(head):
    lm, haar = video_landmarker(redetect_interval_ms=200)
    for i in range(4):
        assert [f.track_id for f in lm.detect_for_video(scene(head, [(10, 80)], seed=i), i * MS).faces] == [0]
    appeared, seen = 4 * MS, None
    for i in range(4, 20):
        faces = lm.detect_for_video(scene(head, [(10, 80), (290, 90)], seed=i), i * MS).faces
        if len(faces) == 2:
            seen = i * MS
            break
    assert seen is not None and seen - appeared <= 200
    assert [f.track_id for f in faces] == [0, 1]  # the first face kept its id
    assert centre(faces[1].box)[0] > 290  # the new one is on the right


def test_a_lost_face_is_found_again_on_the_same_frame_and_keeps_its_id(head):
    lm, haar = video_landmarker()
    face = lm.detect_for_video(scene(head, [(100, 80)]), 0.0).faces[0]
    lm.detect_for_video(scene(head, [(100, 80)], seed=1), MS)
    assert haar.calls == 1
    jump = int(0.9 * (face.box[2] - face.box[0]))  # its last crop now holds a sliver of the face
    faces = lm.detect_for_video(scene(head, [(100 + jump, 80)], seed=2), 2 * MS).faces
    assert haar.calls == 2  # lost: re-detected on this frame
    assert [f.track_id for f in faces] == [0]
    assert abs(centre(faces[0].box)[0] - centre(face.box)[0] - jump) < 0.25 * jump  # the smoothing lags a little


def test_a_face_that_leaves_the_frame_ends_its_track(head):
    lm, haar = video_landmarker()
    counts, i = [], 0
    for x in range(100, 520, 30):  # out through the right edge
        counts.append(len(lm.detect_for_video(scene(head, [(x, 80)], seed=i), i * MS).faces))
        i += 1
    assert counts[0] == 1 and counts[-1] == 0
    gone = counts.index(0)
    assert all(c == 0 for c in counts[gone:])
    faces = lm.detect_for_video(scene(head, [(100, 80)], seed=i), i * MS).faces
    assert [f.track_id for f in faces] == [1]  # back in view: a new track


def test_ids_persist_for_two_faces_and_reset_video_starts_over(head):
    lm, _ = video_landmarker()
    side = {}  # track id -> the head it follows (0: left, 1: right)
    for i in range(10):  # the heads move towards each other
        faces = lm.detect_for_video(scene(head, [(10 + 3 * i, 80), (290 - 3 * i, 100)], seed=i), i * MS).faces
        assert sorted(f.track_id for f in faces) == [0, 1]
        for f in faces:
            assert side.setdefault(f.track_id, int(centre(f.box)[0] > 240)) == int(centre(f.box)[0] > 240)
    assert sorted(side.values()) == [0, 1]
    lm.reset_video()
    faces = lm.detect_for_video(scene(head, [(290, 100)]), 0.0).faces  # time starts over too
    assert [f.track_id for f in faces] == [0]


# --------------------------------------------------------------------------- smoothing


def jitter(points: list[np.ndarray]) -> float:
    p = np.stack(points)
    return float(np.linalg.norm(p[1:] - p[:-1], axis=2).mean())


def test_jitter_on_a_still_face_drops_with_smoothing(head):
    smooth, _ = video_landmarker()
    raw, _ = video_landmarker(smoothing=False)
    a, b = [], []
    for i in range(30):
        frame = scene(head, [(150, 90)], seed=i)  # the face stays; only the sensor noise changes
        a.append(smooth.detect_for_video(frame, i * MS).faces[0].landmarks)
        b.append(raw.detect_for_video(frame, i * MS).faces[0].landmarks)
    assert jitter(b[5:]) > 0.05  # control: the raw points do move with the noise (pixels)
    assert jitter(a[5:]) < 0.5 * jitter(b[5:])


def test_one_euro_follows_each_point_at_its_own_speed():
    """A point moving diagonally lags as little as one moving along an axis (speed per point)."""
    t = np.arange(60) / 30.0
    lags = []
    for direction in ((1.0, 0.0), (np.sqrt(0.5), np.sqrt(0.5))):
        f = OneEuroFilter(0.5, 40.0)
        path = [100.0 * ti * np.array(direction) for ti in t]  # one face size (100 px) a second
        out = [f(p[None], ti, scale=100.0)[0] for p, ti in zip(path, t)]
        lags.append(np.linalg.norm(np.array(path[30:]) - np.array(out[30:]), axis=1).mean())
    assert lags[1] == pytest.approx(lags[0], rel=0.01)


# --------------------------------------------------------------------------- bad input


def test_bad_frames_raise_and_leave_the_stream_as_it_was(head):
    lm, _ = video_landmarker()
    frame = scene(head, [(100, 80)])
    assert [f.track_id for f in lm.detect_for_video(frame, 0.0).faces] == [0]
    bad = [
        (lambda: lm.detect_for_video(frame, 0.0), "must increase"),
        (lambda: lm.detect_for_video(frame, -5.0), "must increase"),
        (lambda: lm.detect_for_video(frame, float("nan")), "finite"),
        (lambda: lm.detect_for_video(frame, "soon"), "must be a number"),
        (lambda: lm.detect_for_video(frame[:240, :320], 40.0), r"320x240 but this video's frames are 480x360"),
        (lambda: lm.detect_for_video(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 40.0), "grayscale"),
        (lambda: lm.detect_for_video(np.zeros((0, 0, 3), np.uint8), 40.0), "expected an H x W"),
        (lambda: lm.detect_for_video(None, 40.0), "numpy array"),
    ]
    for call, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            call()
    # the stream goes on as if they had not come
    assert [f.track_id for f in lm.detect_for_video(frame, 40.0).faces] == [0]
    with pytest.raises(InvalidInputError, match="reset_video"):
        lm.detect_for_video(frame[:240, :320], 80.0)
    lm.reset_video()  # a new stream may have another size, and be gray
    gray = cv2.cvtColor(scene(head, [(10, 20)], size=(240, 320)), cv2.COLOR_RGB2GRAY)
    assert len(lm.detect_for_video(gray, 0.0).faces) == 1
    with pytest.raises(InvalidInputError, match="colour but this video's frames are grayscale"):
        lm.detect_for_video(scene(head, [(10, 20)], size=(240, 320)), 40.0)


def test_video_options_are_validated():
    for bad in ({"redetect_interval_ms": -1}, {"track_min_quality": 1.5}, {"track_iou": "high"}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            FaceLandmarkerOptions(**bad).validate()


# --------------------------------------------------------------------------- pure parts


def test_track_quality_and_the_tracker_rules():
    conf = np.full(68, 0.13)
    assert track_quality(conf, [10, 10, 50, 50], (100, 100)) == pytest.approx(0.13)
    assert track_quality(None, [10, 10, 50, 50], (100, 100)) == 1.0  # a model without confidence
    assert track_quality(conf, [90, 10, 130, 50], (100, 100)) == 0.0  # centre past the right edge
    assert nearest([30, 0, 70, 40], [[300, 0, 340, 40], [0, 0, 40, 40]]) == 1  # 30 px away, less than its 40 px side
    assert nearest([100, 0, 140, 40], [[0, 0, 40, 40]]) is None  # 100 px away: another face
    tr = LandmarkTracker(0.11, 500.0, 0.3, (0.5, 40.0, 1.0))
    assert tr.detection_due(0.0, 8)  # nothing tracked yet
    assert not tr.healthy(0.10) and tr.healthy(0.11) and not tr.healthy(float("nan"))


# --------------------------------------------------------------------------- flm detect on clips


def write_clip(path, head, n: int, fourcc: str = "mp4v") -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 30.0, (FRAME[1], FRAME[0]))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(scene(head, [(100 + 3 * i, 80)], seed=i), cv2.COLOR_RGB2BGR))
    writer.release()


def detect_json(tmp_path, *args) -> dict:
    js = tmp_path / "faces.json"
    assert cli_main(["detect", *map(str, args), "--threads", "1", "--json", str(js)]) == 0
    return json.loads(js.read_text())


def test_flm_detect_tracks_a_clip_and_reports_frames_per_second(head, tmp_path, capsys):
    write_clip(tmp_path / "clip.mp4", head, 12)
    doc = detect_json(tmp_path, tmp_path / "clip.mp4")
    video = doc["files"][0]
    assert doc["tracking"] is True and video["tracking"] is True
    assert len(video["frames"]) == 12 and all(len(f["faces"]) == 1 for f in video["frames"])
    assert {f["faces"][0]["track_id"] for f in video["frames"]} == {0}
    assert video["detector_frames"] == 1  # 12 frames = 0.4 s: the first frame's detection only
    assert video["frames_per_second"] == pytest.approx(1000 / video["ms"], rel=0.05)
    assert "frames / s" in capsys.readouterr().out
    off = detect_json(tmp_path, tmp_path / "clip.mp4", "--no-tracking")["files"][0]
    assert off["tracking"] is False and off["detector_frames"] == 12


def test_flm_detect_reports_and_skips_a_corrupt_frame(head, tmp_path, capsys):
    clip = tmp_path / "clip.avi"
    write_clip(clip, head, 8, fourcc="MJPG")  # one JPEG per frame: frame 3's data can be broken alone
    data = bytearray(clip.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(starts) == 8
    data[starts[3]:starts[4] - 8] = bytes(starts[4] - 8 - starts[3])
    clip.write_bytes(bytes(data))
    video = detect_json(tmp_path, clip)["files"][0]
    assert [f["frame"] for f in video["frames"]] == [0, 1, 2, 4, 5, 6, 7]
    assert video["skipped_frames"] == [3]
    err = capsys.readouterr().err
    assert "frame 3 skipped" in err and "clip.avi" in err
    # the frame after the gap is still tracked, on time
    assert video["frames"][3]["timestamp_ms"] == pytest.approx(4 * MS)
    assert video["frames"][3]["faces"][0]["track_id"] == 0
