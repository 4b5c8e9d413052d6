"""Following faces through a video from their own landmarks (pure numpy).

In video mode a face found in one frame is cropped in the next from the tight box of its last
landmarks — the crop training cuts (`flm.spec.CropRule`, source "landmark-box") — moved on by
the box's recent velocity, so the face detector is not needed while the face stays in view.
Each frame the landmarker runs the model once per tracked face and scores the result
(`track_quality`); a track scoring below `FaceLandmarkerOptions.track_min_quality` is lost, and
the detector runs on that same frame: a face found less than its own size from where the lost
track was resumes it (same id, same smoothing filter; a face that moved that far in one frame
is the face the crop missed), and a lost track no face is found near ends. The detector also
runs every `redetect_interval_ms` while fewer than `max_faces` faces are tracked, to pick up
faces that came into view.

`LandmarkTracker` holds the tracks and makes these decisions; the landmarker runs the models.
Not thread-safe on its own: the landmarker calls it under a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flm.runtime.detectors import box_iou
from flm.runtime.smoothing import OneEuroFilter


@dataclass
class LandmarkTrack:
    """One face followed through the video.

    `box` is the tight box of its last raw (unsmoothed) landmarks, seen at `t`; the next
    frame's crop is cut around it moved on by `velocity` (`LandmarkTracker.predicted_box`).
    `detection_box` and `score` are those of the detection that started (or last
    resumed) it; `quality` is the last frame's `track_quality`; `points` and `confidence` the
    model's raw answer in the last frame."""

    id: int
    box: np.ndarray
    detection_box: np.ndarray
    score: float
    filter: OneEuroFilter
    t: float = 0.0  # when `box` was seen, seconds
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # of the box, px a second
    quality: float = 1.0
    points: np.ndarray | None = None
    confidence: np.ndarray | None = None


def track_quality(confidence: np.ndarray | None, box, image_shape) -> float:
    """How sure the model is that its crop still holds the face: the mean per-point confidence
    (heatmap peak probability, `heatmap_confidence`), or 1.0 for a model without one; 0.0 when
    the landmark box's centre has left the image (whatever the model says)."""
    h, w = image_shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if not (0 <= cx < w and 0 <= cy < h):
        return 0.0
    return 1.0 if confidence is None else float(np.mean(confidence))


def nearest(box, others) -> int | None:
    """Index of the box of `others` whose centre is nearest `box`'s, if nearer than that box's
    larger side (a face a lost track's crop missed has moved by less than its size), else None."""
    if not len(others):
        return None
    o = np.asarray(others, np.float64).reshape(-1, 4)
    d = np.hypot((o[:, 0] + o[:, 2] - box[0] - box[2]) / 2, (o[:, 1] + o[:, 3] - box[1] - box[3]) / 2)
    j = int(np.argmin(d))
    return j if d[j] < max(o[j, 2] - o[j, 0], o[j, 3] - o[j, 1]) else None


# Each frame's crop is the last landmark box moved on by the box's velocity, an exponential
# average of its frame-to-frame changes with this weight on the newest. Measured with
# `benchmarks/stability.py`'s clips (6 faces, flm-68, no smoothing): the last box as it is gives
# 6.36 % NME on the moving segments (0.73 % still jitter), moved by the last change alone 5.38 %
# (0.99 %: the box's own jitter is added to the crop's), by the average with 0.5: 5.38 % (0.82 %).
VELOCITY_SMOOTHING = 0.5


class LandmarkTracker:
    """The tracks of one video stream, and when the detector must run.

    min_quality: a track whose `track_quality` falls below this is lost (see the module doc).
    redetect_ms: while fewer than `max_faces` faces are tracked, the detector runs again when
        this much stream time has passed since it last ran (0: on every frame).
    iou: a detection whose landmark box overlaps a healthy track's by more than this is that
        track's face (not a new one).
    filter_args: (min_cutoff, beta, d_cutoff) of each track's One Euro filter.
    """

    def __init__(self, min_quality: float, redetect_ms: float, iou: float, filter_args: tuple):
        self.min_quality, self.redetect_ms, self.iou = float(min_quality), float(redetect_ms), float(iou)
        self.filter_args = filter_args
        self.reset()

    def reset(self) -> None:
        self.tracks: list[LandmarkTrack] = []
        self.last_detection_ms: float | None = None
        self.dropped = 0  # faces beyond max_faces at the last detector run
        self._next_id = 0

    def detection_due(self, t_ms: float, max_faces: int) -> bool:
        """Whether the detector should look for new faces in the frame at `t_ms`."""
        if not self.tracks or self.last_detection_ms is None:
            return True
        return len(self.tracks) < max_faces and t_ms - self.last_detection_ms >= self.redetect_ms

    def healthy(self, quality: float) -> bool:
        return np.isfinite(quality) and quality >= self.min_quality

    def predicted_box(self, track: LandmarkTrack, t: float) -> np.ndarray:
        """Where the track's landmark box should be at `t` seconds, at its recent velocity."""
        return track.box + track.velocity * (t - track.t)

    def moved(self, track: LandmarkTrack, box: np.ndarray, t: float) -> None:
        """The track's face was found at `box` at `t` seconds: update its box and velocity."""
        if t > track.t:
            v = (box - track.box) / (t - track.t)
            track.velocity = track.velocity + VELOCITY_SMOOTHING * (v - track.velocity)
        track.box, track.t = box, t

    def start(self, box, detection_box, score: float, quality: float, lost: list[LandmarkTrack],
              t: float) -> LandmarkTrack:
        """A track for a detected face: the nearest track lost in this frame whose landmark box
        centre is less than its box side from this one's (resumed: same id and filter), else a
        new one. The caller makes sure the face is not one a healthy track follows."""
        j = nearest(box, [t.box for t in lost])
        if j is not None:
            track = lost.pop(j)
        else:
            track = LandmarkTrack(self._next_id, box, detection_box, score, OneEuroFilter(*self.filter_args))
            self._next_id += 1
        track.box, track.detection_box, track.score, track.quality = box, detection_box, float(score), quality
        track.t, track.velocity = t, np.zeros(4)  # a jump to a detection is not a velocity
        return track

    def without_duplicates(self, tracks: list[LandmarkTrack], iou: float) -> list[LandmarkTrack]:
        """Drop a track that has converged onto another's face (landmark boxes overlapping by
        more than `iou`), keeping the one of higher quality."""
        keep: list[LandmarkTrack] = []
        for t in sorted(tracks, key=lambda t: -t.quality):
            if not keep or box_iou(t.box, np.stack([k.box for k in keep])).max() <= iou:
                keep.append(t)
        return sorted(keep, key=lambda t: t.id)

    def smooth(self, track: LandmarkTrack, points: np.ndarray, t_s: float) -> np.ndarray:
        """The track's One Euro filter applied to this frame's points (time in seconds)."""
        b = track.box
        return track.filter(points, t_s, scale=max(b[2] - b[0], b[3] - b[1], 1.0))
