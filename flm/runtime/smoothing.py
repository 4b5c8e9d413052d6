"""Temporal smoothing and face tracking for video (pure numpy).

`OneEuroFilter` is the filter of Casiez, Roussel and Vogel (CHI 2012): a low-pass filter
whose cut-off rises with the signal's speed, so a still face does not jitter and a moving
face does not lag. `FaceTracker` matches each frame's faces to the previous frame's by IoU
and keeps one filter per tracked face (video mode with `tracking=False`; with tracking, see
`flm.runtime.tracking`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flm.runtime.detectors import box_iou


def _alpha(cutoff, dt: float):
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One Euro filter over arrays of any fixed shape (e.g. (K, 2) landmarks).

    `min_cutoff` (Hz) sets the smoothing of a still signal (lower = smoother), `beta` how
    fast the cut-off rises with speed (higher = less lag), `d_cutoff` (Hz) the smoothing of
    the speed estimate. Speeds are divided by `scale` (e.g. the face size in pixels), so the
    same parameters behave alike for small and large faces. The speed is the length of the
    last axis (for (K, 2) landmarks each point's speed, in whatever direction it moves), so
    the cut-off is per point: a point moving diagonally lags no more than one moving along
    an axis, and a mouth opening is followed while the rest of the face stays smoothed.
    """

    def __init__(self, min_cutoff: float = 0.5, beta: float = 4.0, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError(f"OneEuroFilter needs min_cutoff > 0, d_cutoff > 0, beta >= 0; "
                             f"got {min_cutoff}, {d_cutoff}, {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._x = self._dx = self._t = None

    def __call__(self, x, t: float, scale: float = 1.0) -> np.ndarray:
        """Filtered value of `x` observed at time `t` seconds (strictly increasing)."""
        x = np.asarray(x, np.float64)
        if self._x is None or self._x.shape != x.shape:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        dt = float(t) - self._t
        if dt <= 0:
            raise ValueError(f"OneEuroFilter: time must increase, got {t} after {self._t}")
        dx = (x - self._x) / dt
        self._dx = self._dx + _alpha(self.d_cutoff, dt) * (dx - self._dx)
        speed = np.linalg.norm(self._dx, axis=-1, keepdims=True) if self._dx.ndim else np.abs(self._dx)
        cutoff = self.min_cutoff + self.beta * speed / max(float(scale), 1e-9)
        self._x = self._x + _alpha(cutoff, dt) * (x - self._x)
        self._t = float(t)
        return self._x.copy()


@dataclass
class Track:
    id: int
    box: np.ndarray  # last (unsmoothed) landmark box
    filter: OneEuroFilter
    last_t: float
    missed: int = 0
    hits: int = 1
    extra: dict = field(default_factory=dict)


class FaceTracker:
    """Greedy IoU matching of faces across frames, one One Euro filter per track.

    A face whose box overlaps a live track by more than `iou_threshold` continues it (the
    highest IoU pairs are matched first); other faces start new tracks, and a track unseen
    for more than `max_missed` frames is dropped. Not thread-safe on its own: the landmarker
    calls it under a lock.
    """

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 5, min_cutoff: float = 1.0,
                 beta: float = 10.0, d_cutoff: float = 1.0):
        self.iou_threshold, self.max_missed = float(iou_threshold), int(max_missed)
        self.filter_args = (min_cutoff, beta, d_cutoff)
        self.tracks: list[Track] = []
        self._next_id = 0

    def reset(self) -> None:
        self.tracks, self._next_id = [], 0

    def match(self, boxes) -> list[int | None]:
        """For each box, the index of the live track it continues, or None."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        out: list[int | None] = [None] * len(boxes)
        if not self.tracks or not len(boxes):
            return out
        iou = box_iou(boxes, np.stack([t.box for t in self.tracks]))
        pairs = sorted(((iou[i, j], i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])
                        if iou[i, j] > self.iou_threshold), reverse=True)
        used_b, used_t = set(), set()
        for _, i, j in pairs:
            if i not in used_b and j not in used_t:
                out[i] = j
                used_b.add(i)
                used_t.add(j)
        return out

    def update(self, boxes, points: list[np.ndarray], t: float) -> tuple[list[int], list[np.ndarray]]:
        """Match this frame's faces; returns (track ids, smoothed points) in input order."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        matches = self.match(boxes)
        ids, smoothed, seen = [], [], set()
        for box, pts, j in zip(boxes, points, matches):
            if j is None:
                track = Track(self._next_id, box, OneEuroFilter(*self.filter_args), t)
                self._next_id += 1
                self.tracks.append(track)
            else:
                track = self.tracks[j]
                track.hits += 1
            scale = max(box[2] - box[0], box[3] - box[1], 1.0)
            smoothed.append(track.filter(pts, t, scale=scale))
            track.box, track.last_t, track.missed = box, t, 0
            seen.add(track.id)
            ids.append(track.id)
        for track in self.tracks:
            if track.id not in seen:
                track.missed += 1
        self.tracks = [tr for tr in self.tracks if tr.missed <= self.max_missed]
        return ids, smoothed
