"""The built-in procedural face set: 68-point faces drawn with OpenCV, exact by construction.

Every face starts from one 3-D mean shape in iBUG order (jaw 0-16, brows 17-26, nose 27-35,
eyes 36-47, mouth 48-67), gets an identity (face proportions, skin, hair and iris colour), an
expression (mouth open, smile, brow raise, eye openness) and a pose (yaw +-60 deg, pitch and roll
+-30 deg), and is projected with a pinhole camera. The drawing polygons (face oval, brows, eye
whites with iris, nose, lips, jaw line) are built from the same projected 3-D points, so each
landmark lies on the feature drawn for it.

Jaw points follow the convention of 300W-LP / 3DDFA: on the side turning away from the camera
they slide along the face surface to the visible silhouette; on the near side they stay put.

Everything is a pure function of (seed, index): `face_geometry` gives the points, `render` the
image. A `SyntheticFace` is the picklable zero-argument renderer a `Sample` holds, so faces are
drawn on the fly in any DataLoader worker. Four images share each identity, so validation can
hold whole people out.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from flm.errors import FlmError
from flm.fileio import atomic_path, log_written
from flm.pipeline.data.base import LandmarkDataset, Sample

IMAGES_PER_PERSON = 4
IMAGE_SIZE_RANGE = (192, 256)  # width and height are drawn independently from this range
POSE_LIMITS = {"yaw": 60.0, "pitch": 30.0, "roll": 30.0}  # degrees, symmetric
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates carry 4 fractional bits
_HEAD_DEPTH = 0.25  # depth of the front half of the head's cross-section (face-width units)


# --------------------------------------------------------------------------- the 3-D mean shape
#
# Face-width units: x to the image right, y down, z towards the camera; the jaw spans x = +-0.95,
# the brows sit at y ~ -0.6, the chin at y = 1.0. Point 0 and the eye 36-41 are on the image left.

def _mean_shape() -> np.ndarray:
    pts = np.zeros((68, 3))
    phi = np.pi * np.arange(17) / 16
    pts[:17, 0] = -0.95 * np.cos(phi) * (1 - 0.12 * np.sin(phi))
    pts[:17, 1] = -0.25 + 1.25 * np.sin(phi)
    pts[:17, 2] = 0.0  # the jaw's front-facing depth; `_silhouette` places it on the head surface
    brow = np.array([[-0.72, -0.50, -0.13], [-0.62, -0.58, -0.03], [-0.48, -0.61, 0.05],
                     [-0.35, -0.60, 0.10], [-0.20, -0.56, 0.12]])
    pts[17:22] = brow
    pts[22:27] = brow[::-1] * [-1, 1, 1]
    pts[27:31] = [[0, -0.38, 0.12], [0, -0.22, 0.22], [0, -0.07, 0.32], [0, 0.08, 0.42]]
    pts[31:36] = [[-0.17, 0.18, 0.15], [-0.09, 0.21, 0.22], [0, 0.23, 0.26], [0.09, 0.21, 0.22],
                  [0.17, 0.18, 0.15]]
    pts[36:42] = _eye(-1, 1.0)
    pts[42:48] = _eye(1, 1.0)
    outer = np.array([[-0.30, 0.52], [-0.19, 0.46], [-0.08, 0.43], [0, 0.44], [0.08, 0.43],
                      [0.19, 0.46], [0.30, 0.52], [0.20, 0.60], [0.09, 0.64], [0, 0.65],
                      [-0.09, 0.64], [-0.20, 0.60]])
    inner = np.array([[-0.26, 0.52], [-0.09, 0.505], [0, 0.51], [0.09, 0.505], [0.26, 0.52],
                      [0.09, 0.525], [0, 0.53], [-0.09, 0.525]])
    pts[48:60, :2], pts[60:68, :2] = outer, inner
    pts[48:68, 2] = 0.25 - 0.13 * (np.abs(pts[48:68, 0]) / 0.30) ** 2
    return pts


def _eye(side: int, openness: float, centre=(0.42, -0.33), half_width=0.17) -> np.ndarray:
    """Six eye points (outer corner first for the left eye, inner corner first for the right)."""
    cx, cy = side * centre[0], centre[1]
    up, low = 0.075 * openness, 0.055 * (0.5 + 0.5 * openness)
    # left eye 36-41: outer corner, upper lid (2), inner corner, lower lid (2)
    xs = np.array([-1.0, -0.42, 0.35, 1.0, 0.35, -0.42]) * half_width
    ys = np.array([0.01, -up, -up, 0.02, low, low])
    if side > 0:  # right eye 42-47 mirrors it: inner corner first
        xs, ys = -xs[[3, 2, 1, 0, 5, 4]], ys[[3, 2, 1, 0, 5, 4]]
    zs = 0.02 - 0.10 * (np.abs(xs + cx) - 0.25) / 0.34
    return np.stack([xs + cx, ys + cy, zs], axis=1)


MEAN_SHAPE = _mean_shape()


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class FaceGeometry:
    """Everything `render` draws, in image pixels (pixel centres at integers)."""

    width: int
    height: int
    points: np.ndarray  # (68, 2) the landmarks
    pupils: np.ndarray  # (2, 2) iris centres (left, right)
    iris_radius: np.ndarray  # (2, 2) ellipse half-axes of each iris
    pose: dict  # yaw, pitch, roll in degrees
    oval: np.ndarray  # face outline (jaw then forehead)
    brows: tuple  # two polygons
    nose: np.ndarray  # nose polygon (convex hull)
    nostrils: np.ndarray  # (2, 2) centres
    fringe: np.ndarray | None  # hair over the forehead
    hair_back: np.ndarray | None  # hair behind the head
    teeth: np.ndarray | None
    scale: float  # pixels per face-width unit at the face
    style: dict = field(default_factory=dict)  # colours etc.


def _identity_params(seed: int, person: int) -> dict:
    r = np.random.default_rng([seed, person, 1])
    tone = r.uniform(0, 1)
    skin = (np.array([70, 45, 35]) * (1 - tone) + np.array([245, 215, 190]) * tone
            + r.normal(0, 8, 3))
    hair = [(25, 20, 18), (60, 40, 28), (110, 75, 45), (200, 165, 110), (150, 70, 35),
            (160, 160, 160)][r.choice(6, p=[0.35, 0.25, 0.15, 0.1, 0.07, 0.08])]
    iris = [(70, 45, 30), (40, 28, 20), (70, 110, 150), (80, 110, 70), (110, 110, 110)][r.integers(5)]
    return {
        "person": person,
        "sx": r.normal(1, 0.06), "sy": r.normal(1, 0.06), "sz": r.normal(1, 0.1),
        "eye_dx": r.normal(0, 0.02), "eye_size": r.uniform(0.85, 1.15), "eye_tilt": r.normal(0, 0.015),
        "brow_dy": r.normal(0, 0.025), "brow_th": r.uniform(0.022, 0.045),
        "nose_len": r.normal(0, 0.03), "nose_w": r.uniform(0.85, 1.2),
        "mouth_w": r.uniform(0.85, 1.15), "mouth_dy": r.normal(0, 0.025), "lip": r.uniform(0.7, 1.3),
        "chin_w": r.uniform(0.85, 1.15), "jaw_len": r.normal(1, 0.05),
        "jitter": r.normal(0, 0.007, (68, 3)),
        "skin": np.clip(skin, 20, 250), "hair": np.array(hair) * r.uniform(0.8, 1.2),
        "iris": np.array(iris) * r.uniform(0.8, 1.2),
        "lip_col": np.clip(skin * [0.78, 0.52, 0.52] + [40, 0, 5], 0, 255),
        "hair_style": r.choice(["bald", "short", "long"], p=[0.12, 0.5, 0.38]),
        "hairline": r.uniform(-0.95, -0.8),
    }


def _image_params(seed: int, index: int) -> dict:
    r = np.random.default_rng([seed, index, 2])

    def signed(limit, power=1.3):  # more near-frontal faces than profile ones, full range kept
        u = r.uniform(-1, 1)
        return float(limit * np.sign(u) * abs(u) ** power)

    return {
        "width": int(r.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1)),
        "height": int(r.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1)),
        "yaw": signed(POSE_LIMITS["yaw"]), "pitch": signed(POSE_LIMITS["pitch"], 1.6),
        "roll": signed(POSE_LIMITS["roll"], 1.6),
        "distance": r.uniform(3.5, 12.0),
        "face_frac": r.uniform(0.38, 0.72), "pos": r.uniform(0, 1, 2),
        "mouth_open": 0.0 if r.uniform() < 0.45 else r.uniform(0, 1) ** 1.5,
        "smile": r.uniform(-0.3, 1.0), "brow_raise": r.uniform(-0.5, 1.0),
        "eye_open": float(np.clip(r.normal(1.0, 0.18), 0.35, 1.2)), "gaze": r.uniform(-1, 1, 2),
    }


# --------------------------------------------------------------------------- geometry


def _shape3d(idp: dict, imp: dict) -> np.ndarray:
    """The 68 points in the head frame, with identity and expression applied."""
    p = MEAN_SHAPE.copy()
    eye_open = imp["eye_open"]
    for side, sl in ((-1, slice(36, 42)), (1, slice(42, 48))):
        p[sl] = _eye(side, eye_open * idp["eye_size"], centre=(0.42 + idp["eye_dx"], -0.33),
                     half_width=0.17 * idp["eye_size"])
        corner = 36 if side < 0 else 45
        p[corner, 1] -= idp["eye_tilt"]
    p[17:27, 1] += idp["brow_dy"] - 0.06 * imp["brow_raise"] * (1.2 - 0.4 * np.abs(p[17:27, 0]) / 0.78)
    p[29:36, 1] += idp["nose_len"] * np.array([0.5, 1, 1, 1, 1, 1, 1])
    p[31:36, 0] *= idp["nose_w"]
    mouth = slice(48, 68)
    p[mouth, 0] *= idp["mouth_w"]
    p[mouth, 1] += idp["mouth_dy"] + idp["nose_len"] * 0.5
    centre_y = 0.52 + idp["mouth_dy"] + 0.5 * idp["nose_len"]
    p[mouth, 1] = centre_y + (p[mouth, 1] - centre_y) * idp["lip"]
    # smile: corners up and out, their neighbours half as much
    s = imp["smile"]
    for i, w in ((48, 1), (54, 1), (60, 1), (64, 1), (49, 0.5), (53, 0.5), (59, 0.5), (55, 0.5)):
        p[i, 1] -= 0.06 * s * w
        p[i, 0] += np.sign(p[i, 0]) * 0.03 * s * w
    # mouth open: the lower lip and the chin drop
    drop = 0.22 * imp["mouth_open"]
    for i in (55, 56, 57, 58, 59, 65, 66, 67):
        p[i, 1] += drop * max(0.0, 1 - (p[i, 0] / 0.34) ** 2)
    p[:17, 1] += drop * np.sin(np.pi * np.arange(17) / 16) ** 2
    # jaw shape
    p[:17, 0] *= 1 + (idp["chin_w"] - 1) * np.clip(p[:17, 1], 0, 1)  # narrower or wider chin
    p[:17, 1] = -0.25 + (p[:17, 1] + 0.25) * idp["jaw_len"]
    p += idp["jitter"]
    p[:, 0] *= idp["sx"]
    p[:, 1] *= idp["sy"]
    p[:, 2] *= idp["sz"]
    return p


def _silhouette(front: np.ndarray, side: np.ndarray, yaw_rad: float) -> np.ndarray:
    """Contour points on the head surface, moved to the silhouette on the side turning away.

    Each contour point at half-width a sits on a cross-section x = a cos(b), z = c + d sin(b)
    of depth d = min(_HEAD_DEPTH, 0.6 a); the far side's visible outline is where the view ray grazes
    that section. `side` is -1 (image left), +1 (right), or 0 (the midline).
    """
    a = np.abs(front[:, 0])
    d = np.minimum(_HEAD_DEPTH, 0.6 * a)
    c = front[:, 2] - d
    s = np.where(side == 0, np.sign(yaw_rad) or 1.0, side)
    beta = np.clip(np.arctan2(s * d * np.sin(yaw_rad), a * np.cos(yaw_rad)), 0, np.pi / 2)
    out = front.copy()
    out[:, 0] = s * a * np.cos(beta)
    out[:, 2] = c + d * np.sin(beta)
    return out


def _forehead_z(sin_th):
    """Depth of the forehead's front at the arc angle whose sine is given (slopes back upwards)."""
    return 0.12 - 0.45 * np.asarray(sin_th) ** 2


def _rotation(yaw, pitch, roll) -> np.ndarray:
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def face_geometry(seed: int, index: int) -> FaceGeometry:
    """Landmarks and drawing polygons of face `index` of the set with this `seed`."""
    person = index // IMAGES_PER_PERSON
    idp, imp = _identity_params(seed, person), _image_params(seed, index)
    shape = _shape3d(idp, imp)
    yaw = np.radians(imp["yaw"])
    jaw_side = np.sign(np.arange(17) - 8)
    shape[:17] = _silhouette(shape[:17], jaw_side, yaw)
    fore, fore_top, hairline_y = _forehead(shape, idp, yaw)
    brow0, brow1 = _brow_polygons(shape, idp)
    groups = {"pts": shape, "fore": fore, "iris": _irises(shape, imp), "alae": _alae(idp),
              "brow0": brow0, "brow1": brow1}
    hairline = _hairline(idp, hairline_y, yaw)
    if hairline is not None:
        groups["hairline"] = hairline
    p2, scale = _place(_project(groups, imp), imp)
    oval = np.concatenate([p2["pts"][:17], p2["fore"]])
    fringe, hair_back = _hair(p2, oval, fore_top, idp["hair_style"])
    return FaceGeometry(
        width=imp["width"], height=imp["height"], points=p2["pts"].astype(np.float32),
        pupils=p2["iris"].astype(np.float32), iris_radius=_iris_radii(idp, imp, scale),
        pose={"yaw": imp["yaw"], "pitch": imp["pitch"], "roll": imp["roll"]},
        oval=oval, brows=(p2["brow0"], p2["brow1"]), nose=_nose_polygon(p2), nostrils=_nostrils(p2),
        fringe=fringe, hair_back=hair_back, teeth=_teeth(p2, imp), scale=float(scale),
        style={k: idp[k] for k in ("skin", "hair", "iris", "lip_col")} | {"identity": person},
    )


def _forehead(shape: np.ndarray, idp: dict, yaw: float):
    """(forehead arc, which arc points lie above the hairline, hairline height) in the head frame.

    The arc runs from the right end of the jaw over the top to its left end. The hairline stays
    well above the brows (0.2 clears them at 30 deg pitch), and the fringe covers the part of
    the arc above the hairline's ends."""
    th = np.linspace(0, np.pi, 25)[1:-1]
    fore = np.stack([0.95 * idp["sx"] * np.cos(th), (-0.25 - 0.95 * np.sin(th)) * idp["sy"],
                     _forehead_z(np.sin(th)) * idp["sz"]], axis=1)
    brow_top = (shape[17:27, 1].min() - idp["brow_th"]) / idp["sy"]
    hairline_y = min(idp["hairline"], brow_top - 0.2)
    fore_top = -0.25 - 0.95 * np.sin(th) < hairline_y + 0.02
    fore = _silhouette(fore, np.sign(np.round(np.cos(th), 6)), yaw)
    return fore, fore_top, hairline_y


def _irises(shape: np.ndarray, imp: dict) -> np.ndarray:
    """Iris centres: mid-eye, moved by the gaze towards a corner or lid - always a mix of the
    eye's own points, so they project inside the drawn eye at any pose."""
    irises = []
    for e in (shape[36:42], shape[42:48]):
        upper, lower = e[[1, 2]].mean(0), e[[4, 5]].mean(0)
        mid = (upper + lower) / 2
        irises.append(mid + 0.2 * imp["gaze"][0] * (e[3] - e[0]) / 2 + 0.15 * imp["gaze"][1] * (lower - upper))
    return np.array(irises)


def _alae(idp: dict) -> np.ndarray:
    """The two wings of the nose, in the head frame."""
    return np.array([[-0.2, 0.1, 0.12], [0.2, 0.1, 0.12]]) * [idp["nose_w"], 1, 1] + [0, idp["nose_len"], 0]


def _brow_polygons(shape: np.ndarray, idp: dict) -> list[np.ndarray]:
    """Brows as thick strokes around the landmark line (tapering outwards)."""
    thick = idp["brow_th"] * np.array([0.55, 0.85, 1.0, 1.0, 0.9])
    brow_polys = []
    for sl, t in ((slice(17, 22), thick), (slice(22, 27), thick[::-1])):
        b = shape[sl]
        up, low = b - np.outer(t, [0, 1, 0]), b + np.outer(0.7 * t, [0, 1, 0])
        brow_polys.append(np.concatenate([up, low[::-1]]))
    return brow_polys


def _hairline(idp: dict, hairline_y: float, yaw: float) -> np.ndarray | None:
    """The hairline across the forehead in the head frame; None for a bald head."""
    if idp["hair_style"] == "bald":
        return None
    hx = np.linspace(0.82, -0.82, 9) * idp["sx"]
    hy = hairline_y + 0.06 * (np.abs(hx) / 0.82) ** 2
    hairline = np.stack([hx, hy * idp["sy"],
                         _forehead_z(np.clip((-hy - 0.25) / 0.95, 0, 1)) * idp["sz"]], axis=1)
    return _silhouette(hairline, np.sign(np.round(hx, 6)), yaw)


def _project(groups: dict, imp: dict) -> dict:
    """Every group of head-frame points through one pinhole camera, in face-width units."""
    rot = _rotation(imp["yaw"], imp["pitch"], imp["roll"])
    centre = np.array([0, 0, -0.5])
    dist = imp["distance"]
    proj = {}
    for name, g in groups.items():
        cam = (g - centre) @ rot.T + centre
        proj[name] = cam[:, :2] * (dist / (dist - cam[:, 2]))[:, None]
    return proj


def _place(proj: dict, imp: dict) -> tuple[dict, float]:
    """(groups in image pixels, pixels per face-width unit): the landmark box side is face_frac
    times the smaller image side, anywhere inside the image."""
    w, h = imp["width"], imp["height"]
    pts = proj["pts"]
    lo, hi = pts.min(0), pts.max(0)
    scale = imp["face_frac"] * min(w, h) / max(hi - lo)
    margin = 2.0
    room = np.array([w - 1, h - 1]) - 2 * margin - (hi - lo) * scale
    offset = margin + np.maximum(room, 0) * imp["pos"] - lo * scale
    return {k: v * scale + offset for k, v in proj.items()}, scale


def _iris_radii(idp: dict, imp: dict, scale: float) -> np.ndarray:
    """(2, 2) ellipse half-axes of each iris, narrowed by yaw and pitch."""
    dist = imp["distance"]
    iris_r = 0.075 * idp["eye_size"] * idp["sx"] * scale * dist / (dist - 0.1)
    return np.array([[iris_r * max(0.35, np.cos(np.radians(imp["yaw"]))),
                      iris_r * max(0.35, np.cos(np.radians(imp["pitch"])))]] * 2)


def _nose_polygon(p2: dict) -> np.ndarray:
    return cv2.convexHull(np.concatenate([p2["pts"][27:36], p2["alae"]]).astype(np.float32))[:, 0]


def _nostrils(p2: dict) -> np.ndarray:
    """Just above points 32 and 34 (the landmark stays on the dark nostril's lower rim)."""
    return p2["pts"][[32, 34]] - (p2["pts"][[32, 34]] - p2["pts"][[30, 30]]) * 0.1


def _hair(p2: dict, oval: np.ndarray, fore_top: np.ndarray, style: str):
    """(fringe, hair behind the head) in pixels; both None without a hairline (bald)."""
    if "hairline" not in p2:
        return None, None
    fringe = np.concatenate([p2["fore"][fore_top], p2["hairline"][::-1]])
    cen = oval.mean(0)
    grow = 1.12 if style == "short" else 1.2
    hair_back = cen + (p2["fore"] - cen) * grow  # from the right over the top to the left
    if style == "long":  # down to the shoulders on both sides
        down = p2["pts"][8] - p2["pts"][27]
        sides = cen + (p2["pts"][[16, 0]] - cen) * grow + down
        hair_back = np.concatenate([sides[:1], hair_back, sides[1:]])
    return fringe, hair_back


def _teeth(p2: dict, imp: dict) -> np.ndarray | None:
    """The upper teeth of a mouth open wide enough to show them, else None."""
    if imp["mouth_open"] <= 0.25:
        return None
    upper = p2["pts"][60:65]
    gap = np.linalg.norm(p2["pts"][66] - p2["pts"][62])
    return np.concatenate([upper, upper[::-1] + [0, 0.35 * gap]])


# --------------------------------------------------------------------------- drawing


def _fx(pts) -> np.ndarray:
    return np.round(np.asarray(pts, np.float64) * (1 << _SHIFT)).astype(np.int32)


def _fill(img, poly, colour):
    cv2.fillPoly(img, [_fx(poly)], _col(colour), cv2.LINE_AA, _SHIFT)


def _line(img, poly, colour, thick, closed=False):
    cv2.polylines(img, [_fx(poly)], closed, _col(colour), max(1, int(round(thick))), cv2.LINE_AA, _SHIFT)


def _col(c):
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def _background(r: np.random.Generator, w: int, h: int) -> np.ndarray:
    kind = r.choice(["gradient", "blobs", "noise", "clutter"], p=[0.3, 0.3, 0.15, 0.25])
    if kind == "blobs" or kind == "noise":
        k = int(r.integers(2, 7)) if kind == "blobs" else int(r.integers(24, 64))
        small = r.integers(0, 256, (k, k, 3), dtype=np.uint8)
        interp = cv2.INTER_CUBIC if kind == "blobs" else cv2.INTER_NEAREST
        return cv2.resize(small, (w, h), interpolation=interp)
    # a smooth gradient between random corner colours
    img = cv2.resize(r.integers(0, 256, (2, 2, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "clutter":
        for _ in range(int(r.integers(4, 14))):
            col = _col(r.uniform(0, 255, 3))
            x, y = int(r.integers(0, w)), int(r.integers(0, h))
            s = int(r.integers(8, max(9, w // 2)))
            if r.uniform() < 0.5:
                cv2.rectangle(img, (x, y), (x + s, y + int(r.integers(4, s + 1))), col, -1)
            else:
                cv2.line(img, (x, y), (int(r.integers(0, w)), int(r.integers(0, h))), col, int(r.integers(1, 6)))
    return img


def _draw_eye(img, eye: np.ndarray, iris_c, iris_r, geo_style, white, liner, lid_th):
    x0, y0 = np.floor(eye.min(0)).astype(int) - 2
    x1, y1 = np.ceil(eye.max(0)).astype(int) + 3
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, img.shape[1]), min(y1, img.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    local = eye - [x0, y0]
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fx(local)], 255, cv2.LINE_8, _SHIFT)
    layer = roi.copy()
    _fill(layer, local, white)
    c = _fx(np.asarray(iris_c) - [x0, y0])
    axes = _fx(iris_r)
    cv2.ellipse(layer, tuple(int(v) for v in c), tuple(int(v) for v in axes), 0, 0, 360,
                _col(geo_style["iris"]), -1, cv2.LINE_AA, _SHIFT)
    cv2.ellipse(layer, tuple(int(v) for v in c), tuple(int(v) for v in axes // 2), 0, 0, 360,
                (12, 10, 10), -1, cv2.LINE_AA, _SHIFT)
    np.copyto(roi, layer, where=mask[..., None] > 0)
    _line(img, eye, liner, lid_th, closed=True)
    _line(img, eye[:4], liner, lid_th * 1.6)  # corner, upper lid, corner: lashes


def render(seed: int, index: int, clean: bool = False, features: bool = True) -> np.ndarray:
    """Face `index` of set `seed` as an RGB uint8 image.

    `clean=True` leaves out the occluders, blur and noise (tests look at exact pixels);
    `features=False` also leaves out brows, eyes, nose, mouth and jaw line (a bare face to
    compare against).
    """
    g = face_geometry(seed, index)
    r = np.random.default_rng([seed, index, 3])
    img = _background(r, g.width, g.height)
    white = _draw_head(img, g, r)
    if features:
        _draw_features(img, g, white)
    if not clean:
        _occluders(img, g, r)
    out = _lighting(img, r)
    if not clean:
        out = _degrade(out, r)
    return np.clip(out, 0, 255).astype(np.uint8)


def _draw_head(img, g: FaceGeometry, r: np.random.Generator) -> np.ndarray:
    """Hair behind, neck, face and fringe, with soft shading; returns the eye-white colour.

    The eye white is drawn from `r` here, so whether the features are drawn does not shift `r`."""
    skin = np.asarray(g.style["skin"], np.float64)
    if g.hair_back is not None:
        _fill(img, g.hair_back, g.style["hair"] * 0.85)
    neck = np.array([g.points[5], g.points[11], g.points[11] + [0, g.height], g.points[5] + [0, g.height]])
    _fill(img, neck, skin * 0.82)
    _fill(img, g.oval, skin)
    # soft shading: a lighter inner face, shifted towards the light
    cen = g.oval.mean(0)
    light = r.uniform(-1, 1, 2) * g.scale * 0.08
    white = np.array([238, 234, 228]) * r.uniform(0.85, 1.0)
    _fill(img, cen + (g.oval - cen) * 0.78 + light, skin * 1.06)
    if g.fringe is not None:
        _fill(img, g.fringe, g.style["hair"])
    return white


def _draw_features(img, g: FaceGeometry, white) -> None:
    """Jaw line, nose, eyes, brows and mouth."""
    st, u = g.style, g.scale  # u: pixels per face-width unit
    skin = np.asarray(st["skin"], np.float64)
    _line(img, g.points[:17], skin * 0.6, max(1.0, 0.015 * u))
    _draw_nose(img, g, skin)
    for k, sl in enumerate((slice(36, 42), slice(42, 48))):
        _draw_eye(img, g.points[sl], g.pupils[k], g.iris_radius[k], st, white, skin * 0.35, max(1.0, 0.012 * u))
    for poly in g.brows:
        _fill(img, poly, np.minimum(st["hair"] * 0.7, skin * 0.5))  # brows: darker than skin
    _draw_mouth(img, g)


def _draw_nose(img, g: FaceGeometry, skin: np.ndarray) -> None:
    u = g.scale
    _fill(img, g.nose, skin * 1.03)
    for c in g.nostrils:
        cv2.ellipse(img, tuple(int(v) for v in _fx(c)),
                    tuple(int(v) for v in _fx([0.045 * u, 0.022 * u])), 0, 0, 360,
                    _col(skin * 0.35), -1, cv2.LINE_AA, _SHIFT)
    _line(img, g.points[27:31], skin * 0.78, max(1.0, 0.02 * u))
    _line(img, g.points[31:36], skin * 0.55, max(1.0, 0.015 * u))


def _draw_mouth(img, g: FaceGeometry) -> None:
    u, lip = g.scale, g.style["lip_col"]
    _fill(img, g.points[48:60], lip)
    _fill(img, g.points[60:68], (60, 20, 25))
    if g.teeth is not None:
        _fill(img, g.teeth, (235, 232, 220))
    _line(img, g.points[48:60], lip * 0.75, max(1.0, 0.008 * u), closed=True)
    _line(img, g.points[60:68], (45, 15, 20), max(1.0, 0.01 * u), closed=True)


def _lighting(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A brightness ramp across the image (the light's side brighter) and a colour cast, as float32."""
    h, w = img.shape[:2]
    a, k = r.uniform(0, 2 * np.pi), r.uniform(0.0, 0.6)
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * 0.5
    ramp = 1 + k * (corners @ [np.cos(a), np.sin(a)])
    gain = (ramp[:, None] * r.uniform(0.9, 1.1, 3) * r.uniform(0.75, 1.15)).reshape(2, 2, 3)
    out = img.astype(np.float32)
    cv2.multiply(out, cv2.resize(gain.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), dst=out)
    return out


def _degrade(out: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Sometimes blur, sometimes a low-resolution copy, often sensor noise."""
    h, w = out.shape[:2]
    if r.uniform() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), r.uniform(0.3, 1.6))
    if r.uniform() < 0.15:  # low resolution
        f = r.uniform(0.3, 0.6)
        small = cv2.resize(out, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if r.uniform() < 0.6:
        cv2.scaleAdd(_noise_patch(r, w, h), r.uniform(2, 10), out, dst=out)
    return out


_NOISE: list[np.ndarray] = []


def _noise_patch(r: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A (h, w, 3) window of unit Gaussian noise at a random place in a fixed tile.

    Drawing fresh normals costs more than the whole face; a window of one tile, made once per
    process from a fixed seed, is as random to a model and keeps each image deterministic.
    """
    if not _NOISE:
        _NOISE.append(np.random.default_rng(12345).standard_normal((512, 512, 3), dtype=np.float32))
    tile = _NOISE[0]
    y, x = int(r.integers(0, tile.shape[0] - h + 1)), int(r.integers(0, tile.shape[1] - w + 1))
    return tile[y:y + h, x:x + w]


def _occluders(img, g: FaceGeometry, r: np.random.Generator) -> None:
    if r.uniform() >= 0.35:
        return
    for _ in range(int(r.integers(1, 3))):
        c = g.points[int(r.integers(68))] + r.normal(0, 0.1 * g.scale, 2)
        size = r.uniform(0.15, 0.45, 2) * g.scale
        col = _col(r.uniform(0, 255, 3))
        if r.uniform() < 0.5:
            ang = r.uniform(0, 180)
            box = cv2.boxPoints(((float(c[0]), float(c[1])), (float(size[0]), float(size[1])), float(ang)))
            _fill(img, box, col)
        else:
            cv2.ellipse(img, tuple(int(v) for v in _fx(c)), tuple(int(v) for v in _fx(size / 2)),
                        float(r.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA, _SHIFT)


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class SyntheticFace:
    """A picklable zero-argument renderer: `Sample.image` for face `index` of set `seed`."""

    seed: int
    index: int

    def __call__(self) -> np.ndarray:
        return render(self.seed, self.index)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) without drawing."""
        p = _image_params(self.seed, self.index)
        return p["width"], p["height"]


def identity_name(seed: int, person: int) -> str:
    # no trailing `_<digits>`, so Udacity file names `<identity>_<index>.jpg` give it back
    return f"synth-s{seed}-p{person:05d}"


def synthetic_dataset(n: int = 1200, seed: int = 0) -> LandmarkDataset:
    """`n` procedural faces (IMAGES_PER_PERSON per identity), rendered lazily."""
    samples = []
    for i in range(n):
        g = face_geometry(seed, i)
        samples.append(Sample(SyntheticFace(seed, i), g.points,
                              identity=identity_name(seed, i // IMAGES_PER_PERSON),
                              meta={**{k: float(v) for k, v in g.pose.items()}, "pupils": g.pupils,
                                    "index": i}))
    return LandmarkDataset(f"synthetic:{n}:{seed}", "ibug68", samples)


def write_udacity(ds: LandmarkDataset, out_dir, quality: int = 95, progress=None) -> Path:
    """Write `ds` as a Udacity keypoints set: OUT/images/*.jpg + OUT/landmarks.csv.

    The whole folder is built beside OUT and renamed into place, so a crash never leaves a
    CSV naming missing images. An existing OUT is replaced only if it holds nothing but a
    previous set (landmarks.csv and images/). `progress(done, total)` is called per image.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FlmError(f"{out}: exists and is not a folder")
        extra = sorted(p.name for p in out.iterdir() if p.name not in ("landmarks.csv", "images"))
        if extra:
            raise FlmError(f"{out}: refusing to replace a folder that holds other files "
                           f"({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}); choose an empty --out")
    if ds.num_points != 68:
        raise FlmError(f"{ds.name}: the Udacity layout holds 68 points, this set has {ds.num_points}")
    started = time.perf_counter()
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow([""] + [str(i) for i in range(136)])
        for k, s in enumerate(ds.samples):
            ident = s.identity or "face"
            name = f"{ident}_{k:06d}.jpg"
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(s.load(), cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise FlmError(f"cannot encode image {k} of {ds.name} as JPEG")
            data.tofile(str(tmp / "images" / name))
            wr.writerow([name] + [f"{v:.3f}" for v in s.points.reshape(-1)])
            if progress:
                progress(k + 1, len(ds))
        (tmp / "landmarks.csv").write_text(buf.getvalue(), encoding="utf-8")
    log_written(out, started)
    return out
