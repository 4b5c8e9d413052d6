"""Landmark-consistent augmentation: every geometric change moves the points with the pixels.

Geometry is one affine per sample (box jitter, scale, rotation, shift, flip) built by
`flm.geometry.crop_matrix` — the same function the runtime uses to cut its crops — so
training crops and runtime crops can never drift apart. Photometric changes act on pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from flm.geometry import crop_matrix, flip_permutation, landmark_box, transform_points, warp
from flm.spec import ModelSpec


@dataclass(frozen=True)
class AugmentConfig:
    box_jitter: float = 0.05  # each box edge moves by up to this fraction of the box size
    scale: float = 0.10  # zoom in [1 - s, 1 + s]
    rotation: float = 20.0  # degrees, uniform in [-r, r]
    shift: float = 0.04  # crop centre moves by up to this fraction of the crop side
    flip: float = 0.5
    color: float = 0.3  # brightness / contrast / saturation jitter strength
    grayscale: float = 0.1
    erase: float = 0.2  # probability of one random occluding rectangle
    noise: float = 0.2  # probability of Gaussian noise
    blur: float = 0.2  # probability of a Gaussian blur
    pose: float = 0.0  # probability of turning the face out of plane (`turn_face`)
    pose_yaw: float = 50.0  # largest added yaw of that turn, degrees (pitch: 2/5 of it)
    flip_shift: float = 0.0  # the labels' x offset from their mirror-consistent place, image pixels

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    @classmethod
    def from_options(cls, strength: float = 1.0, crop: float = 1.0, flip: float = 0.5, pose: float = 0.0,
                     pose_yaw: float = 50.0) -> "AugmentConfig":
        """The augmentation `flm train`'s --aug-* options (and a recipe's aug_* keys) describe."""
        return replace(cls().scaled(strength, crop), flip=flip, pose=pose, pose_yaw=pose_yaw)

    def scaled(self, strength: float, crop: float = 1.0) -> "AugmentConfig":
        """Rotation and the photometric changes times `strength`, crop jitter times `crop`.

        0 = none, 1 = these defaults. Light augmentation for a last few epochs lets an
        underfitting model fit the clean crops it is evaluated on. The crop jitter (box, scale,
        shift) has its own factor because it stands for the error of a face detector's box, which
        the runtime meets: weakening it helps the ground-truth-box benchmark and can hurt end to
        end (see the model card). The flip is a separate choice because it depends on the labels.
        """
        def factor(k):
            return 1.0 if k in _OWN else crop if k in _CROP else strength

        return AugmentConfig(**{k: min(v * factor(k), 1.0) if k in _PROBABILITIES else v * factor(k)
                                for k, v in vars(self).items()})


_CROP = {"box_jitter", "scale", "shift"}
_OWN = {"flip", "pose", "pose_yaw", "flip_shift"}  # set on their own, not scaled
_PROBABILITIES = {"grayscale", "erase", "noise", "blur"}


def make_crop(image: np.ndarray, points: np.ndarray, spec: ModelSpec, rng: np.random.Generator | None,
              aug: AugmentConfig | None, box=None):
    """Cut the model-input crop from an RGB image; returns (crop uint8, points in crop pixels).

    With `aug=None` this is the deterministic evaluation crop around the landmark box.
    """
    if aug is not None and rng is not None and aug.pose and len(points) == 68 and rng.random() < aug.pose:
        yaw = rng.uniform(-aug.pose_yaw, aug.pose_yaw)
        image, points = turn_face(image, points, yaw, rng.uniform(-0.4, 0.4) * aug.pose_yaw)
        box = None
    box = landmark_box(points) if box is None else np.asarray(box, np.float64)
    size = spec.input_size
    if aug is None or rng is None:
        m = crop_matrix(box, spec.crop, size)
        return warp(image, m, size), transform_points(points, m).astype(np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    box = box + rng.uniform(-aug.box_jitter, aug.box_jitter, 4) * np.array([w, h, w, h])
    flip = rng.random() < aug.flip
    m = crop_matrix(box, spec.crop, size, angle_deg=rng.uniform(-aug.rotation, aug.rotation),
                    scale=rng.uniform(1 - aug.scale, 1 + aug.scale),
                    shift=tuple(rng.uniform(-aug.shift, aug.shift, 2)), flip=flip)
    crop = warp(image, m, size)
    pts = transform_points(points - [2 * aug.flip_shift, 0] if flip else points, m)
    if flip:
        pts = pts[flip_permutation(spec.scheme)]
    return photometric(crop, rng, aug), pts.astype(np.float32)


def photometric(crop: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    img = crop.astype(np.float32)
    if aug.color:
        c = aug.color
        img = img * rng.uniform(1 - c, 1 + c) + rng.uniform(-c, c) * 64  # contrast, brightness
        gray = img.mean(axis=2, keepdims=True)
        img = gray + (img - gray) * rng.uniform(1 - c, 1 + c)  # saturation
    if rng.random() < aug.grayscale:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    if rng.random() < aug.blur:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.5))
    if rng.random() < aug.noise:
        img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
    if rng.random() < aug.erase:
        s = img.shape[0]
        eh, ew = (rng.uniform(0.1, 0.4, 2) * s).astype(int)
        y, x = rng.integers(0, s - eh), rng.integers(0, s - ew)
        img[y:y + eh, x:x + ew] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- out-of-plane turns
#
# Most 68-point training faces look at the camera. `turn_face` makes a turned face from a frontal
# one, the way 300W-LP was made (Zhu et al. 2016), with a generic face instead of a fitted 3DMM:
# the points get the depth of flm's 3-D mean face (aligned to them by a similarity), five forehead
# points and a fixed ring around the head join them, the whole mesh turns about the head's centre,
# and the image is warped triangle by triangle, far triangles first so the near ones cover them.
# The landmarks are the turned 3-D points, so the far jaw follows the 3-D contour (the AFLW2000-3D
# convention), not the visible silhouette.

_JAW_DEPTH = -0.45 + 0.6 * np.sin(np.pi * np.arange(17) / 16) ** 1.5  # ears -0.45 .. chin 0.15
_FOREHEAD = np.array([[x, -0.95, 0.1 - 0.3 * (x / 0.6) ** 2] for x in (-0.6, -0.3, 0.0, 0.3, 0.6)])
_PIVOT = np.array([0.0, 0.1, -0.7])  # the head's centre of rotation, face-width units


def _template() -> np.ndarray:
    from flm.pipeline.data.synthetic import MEAN_SHAPE
    t = MEAN_SHAPE.copy()
    t[:17, 2] = _JAW_DEPTH
    return np.vstack([t, _FOREHEAD])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) with dst ~ s R src + t in the least-squares sense (Umeyama, 2-D, no reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    r = u @ d @ vt
    s = float((sig * np.diag(d)).sum() / (a ** 2).sum())
    return s, r, mu_d - s * r @ mu_s


def turn_face(image: np.ndarray, points: np.ndarray, yaw: float, pitch: float = 0.0):
    """The face of `image` (68 `points`) turned by `yaw` / `pitch` degrees: (image, points)."""
    t3 = _template()
    s, r, t = fit_similarity(t3[:68, :2], np.asarray(points, np.float64))
    face = np.vstack([(np.asarray(points, np.float64) - t) @ r / s, t3[68:, :2]])  # face frame
    mesh = np.hstack([face, t3[:, 2:]])
    rot = _turn_matrix(yaw, pitch)
    turned = (mesh - _PIVOT) @ rot.T + _PIVOT
    h, w = image.shape[:2]
    ring = _ring(face, t, r, s, w, h)
    src = np.vstack([face @ r.T * s + t, ring])
    dst = np.vstack([turned[:, :2] @ r.T * s + t, ring])
    depth = np.concatenate([turned[:, 2], np.full(len(ring), -10.0)])
    return _warp_mesh(image, src, dst, depth), dst[:68].astype(np.float32)


def _turn_matrix(yaw: float, pitch: float) -> np.ndarray:
    y, p = np.radians([yaw, pitch])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rx @ ry


def _ring(face, t, r, s, w, h) -> np.ndarray:
    """Fixed anchors: an ellipse around the head (face frame) and the image's corners and edges."""
    a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    centre = face.mean(0)
    ellipse = np.stack([centre[0] + 1.6 * np.cos(a), centre[1] + 1.8 * np.sin(a)], 1) @ r.T * s + t
    lo = np.minimum(ellipse.min(0), 0) - 1
    hi = np.maximum(ellipse.max(0), [w - 1, h - 1]) + 1
    xs, ys = np.linspace(lo[0], hi[0], 5), np.linspace(lo[1], hi[1], 5)
    frame = [(x, y) for x in xs for y in ys if x in (lo[0], hi[0]) or y in (lo[1], hi[1])]
    return np.vstack([ellipse, np.array(frame)])


def _warp_mesh(image: np.ndarray, src: np.ndarray, dst: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Piecewise-affine warp: every triangle of the mesh (Delaunay on `src`) moves to `dst`.
    Triangles are painted far to near; those the turn folds over (facing away) are not painted."""
    from scipy.spatial import Delaunay

    tris = Delaunay(src).simplices
    h, w = image.shape[:2]
    label = np.full((h, w), -1, np.int32)
    inverse = np.zeros((len(tris), 2, 3))
    for k in np.argsort(depth[tris].mean(1)):
        a, b = src[tris[k]], dst[tris[k]]
        if _signed_area(a) * _signed_area(b) <= 0:
            continue  # folded over: the far side of the turned face
        inverse[k] = cv2.getAffineTransform(b.astype(np.float32), a.astype(np.float32))
        cv2.fillConvexPoly(label, np.round(b * 16).astype(np.int32), int(k), cv2.LINE_8, shift=4)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    m = inverse[np.maximum(label, 0)]
    mx = m[..., 0, 0] * xs + m[..., 0, 1] * ys + m[..., 0, 2]
    my = m[..., 1, 0] * xs + m[..., 1, 1] * ys + m[..., 1, 2]
    outside = label < 0
    mx[outside], my[outside] = xs[outside], ys[outside]
    return cv2.remap(image, mx.astype(np.float32), my.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _signed_area(tri: np.ndarray) -> float:
    (x0, y0), (x1, y1), (x2, y2) = tri
    return float((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0))
