"""Drawing helpers for apps and `flm detect`: landmarks by region, boxes, pose axes, sunglasses.

All functions draw in place on a BGR uint8 image (OpenCV's order, what `cv2.imwrite`
expects) and return it; `annotate` copies first. Coordinates are sub-pixel: OpenCV's `shift`
argument keeps 1/16-pixel precision, so points sit where the model put them.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from flm.geometry import REGION_COLORS_BGR, point_regions

_SHIFT = 4
_ONE = 1 << _SHIFT

# per scheme: (indices of the eye on the image's left, of the eye on the right, nose-bridge index or None)
EYE_POINTS = {
    68: (list(range(36, 42)), list(range(42, 48)), 27),
    98: (list(range(60, 68)), list(range(68, 76)), 51),
    12: (list(range(0, 6)), list(range(6, 12)), None),
}


def _fix(p) -> tuple[int, int]:
    return int(round(float(p[0]) * _ONE)), int(round(float(p[1]) * _ONE))


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray, radius: float | None = None) -> np.ndarray:
    """Points coloured by face region (jaw, brows, nose, eyes, mouth)."""
    pts = np.asarray(landmarks, np.float64)
    if radius is None:
        span = float(np.ptp(pts, axis=0).max()) if len(pts) else 0.0
        radius = min(4.0, max(1.0, span / 120.0))
    for p, region in zip(pts, point_regions(len(pts))):
        if np.isfinite(p).all():
            cv2.circle(image, _fix(p), int(radius * _ONE), REGION_COLORS_BGR[region], -1, cv2.LINE_AA, _SHIFT)
    return image


def draw_box(image: np.ndarray, box, color=(0, 255, 0), label: str | None = None) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    t = max(1, round(max(image.shape[:2]) / 500))
    cv2.rectangle(image, _fix((x0, y0)), _fix((x1, y1)), color, t, cv2.LINE_AA, _SHIFT)
    if label:
        cv2.putText(image, label, (int(x0), max(12, int(y0) - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * t, color, t, cv2.LINE_AA)
    return image


def draw_pose_axes(image: np.ndarray, pose, length_mm: float = 60.0) -> np.ndarray:
    """The head's x (red, to the subject's left), y (green, down) and z (blue, out of the face) axes at the nose tip."""
    axes = np.array([[0, 0, 0], [length_mm, 0, 0], [0, length_mm, 0], [0, 0, -length_mm]], np.float64)
    pts, _ = cv2.projectPoints(axes, np.asarray(pose.rvec, np.float64).reshape(3, 1),
                               np.asarray(pose.tvec, np.float64).reshape(3, 1), pose.camera, None)
    pts = pts.reshape(-1, 2)
    if not np.isfinite(pts).all():
        return image
    # thick enough to see next to the landmark dots: with the image, and with the face (longest axis / 25)
    longest = float(np.hypot(*(pts[1:] - pts[0]).T).max())
    t = max(1, round(max(image.shape[:2]) / 400), min(8, round(longest / 25)))
    for end, color in zip(pts[1:], ((0, 0, 255), (0, 255, 0), (255, 0, 0))):
        cv2.line(image, _fix(pts[0]), _fix(end), color, t, cv2.LINE_AA, _SHIFT)
    return image


def sunglasses_geometry(landmarks: np.ndarray):
    """(left eye centre, right eye centre, bridge point, angle in degrees, lens half-width).

    Lenses are centred on the eye-contour means, tilted with the line through them and
    sized from their distance; the bridge sits on the nose bridge point where the scheme has
    one. None when the scheme has no eye points flm knows.
    """
    pts = np.asarray(landmarks, np.float64)
    if len(pts) not in EYE_POINTS:
        return None
    li, ri, bridge = EYE_POINTS[len(pts)]
    le, re = pts[li].mean(axis=0), pts[ri].mean(axis=0)
    d = re - le
    dist = float(np.hypot(*d))
    if not np.isfinite(dist) or dist < 1e-3:
        return None
    angle = math.degrees(math.atan2(d[1], d[0]))
    b = pts[bridge] if bridge is not None and np.isfinite(pts[bridge]).all() else (le + re) / 2
    return le, re, b, angle, 0.48 * dist


def draw_sunglasses(image: np.ndarray, landmarks: np.ndarray, opacity: float = 0.85) -> np.ndarray:
    """The seed's "fun with keypoints" overlay: dark lenses over the eyes, a bridge, two arms."""
    g = sunglasses_geometry(landmarks)
    if g is None:
        return image
    le, re, bridge, angle, half = g
    overlay = image.copy()
    t = max(1, round(half / 8))
    axes = (int(half * _ONE), int(0.72 * half * _ONE))
    for c in (le, re):
        cv2.ellipse(overlay, _fix(c), axes, angle, 0, 360, (25, 20, 20), -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(overlay, _fix(c), axes, angle, 0, 360, (10, 10, 10), t, cv2.LINE_AA, _SHIFT)
        # a highlight so the lenses read as glass
        hl = c + half * 0.35 * np.array([-math.cos(math.radians(angle + 35)), -math.sin(math.radians(angle + 35))])
        cv2.ellipse(overlay, _fix(hl), (int(0.25 * half * _ONE), int(0.1 * half * _ONE)), angle - 20, 0, 360,
                    (120, 120, 120), -1, cv2.LINE_AA, _SHIFT)
    u = (re - le) / max(np.linalg.norm(re - le), 1e-6)
    # bridge: from the inner edge of one lens over the nose bridge to the other
    a, b = le + u * half, re - u * half
    top = np.array([bridge[0], min(bridge[1], (a[1] + b[1]) / 2)])
    cv2.polylines(overlay, [np.array([_fix(a), _fix(top), _fix(b)], np.int32)], False, (10, 10, 10), t,
                  cv2.LINE_AA, _SHIFT)
    for c, s in ((le, -1), (re, 1)):  # arms towards the ears
        start = c + s * u * half
        cv2.line(overlay, _fix(start), _fix(start + s * u * 0.6 * half), (10, 10, 10), t, cv2.LINE_AA, _SHIFT)
    cv2.addWeighted(overlay, opacity, image, 1 - opacity, 0, dst=image)
    return image


def annotate(image_bgr: np.ndarray, result, *, points: bool = True, boxes: bool = True, pose: bool = True,
             sunglasses: bool = False) -> np.ndarray:
    """A copy of `image_bgr` with every face of `result` drawn on it."""
    img = np.ascontiguousarray(image_bgr).copy()
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    for face in result.faces:
        if sunglasses:
            draw_sunglasses(img, face.landmarks)
        if boxes:
            label = f"{face.score:.2f}" if face.track_id is None else f"#{face.track_id} {face.score:.2f}"
            draw_box(img, face.box, label=label)
        if points:
            draw_landmarks(img, face.landmarks)
        if pose and face.pose is not None:
            draw_pose_axes(img, face.pose)
    return img
