"""Small fixture files written by the tests themselves: images, PNG chunks, annotation files.

Images default to W x H = 120 x 100 pixels; `face_points` are 68 random points inside such an image.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

W, H = 120, 100  # fixture image size


def face_points(seed=0, n=68, w=W, h=H):
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(5, w - 5, n), rng.uniform(5, h - 5, n)]).round(2)


def write_image(path: Path, w=W, h=H, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if path.suffix.lower() in (".pgm", ".pbm"):  # grey-only types
        img = img[..., 0]
    elif path.suffix.lower() in (".pfm", ".hdr"):  # float types
        img = img.astype(np.float32) / 255
    ok, data = cv2.imencode(path.suffix.lower(), img)
    assert ok
    data.tofile(str(path))
    return path


def dot_image(points, size=(240, 200)):
    """An image with one uniquely coloured 3x3 dot per point; colour encodes the index."""
    img = np.zeros((size[1], size[0], 3), np.uint8)
    for i, (x, y) in enumerate(np.round(points).astype(int)):
        img[y - 1:y + 2, x - 1:x + 2] = (40 + 3 * i, 255 - 3 * i, 128)
    return img


# --------------------------------------------------------------------------- PNG bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_header(path: Path, side=20000) -> Path:
    """Only the first bytes of a PNG claiming side x side pixels: the check must need no pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))
    return path


# --------------------------------------------------------------------------- annotation files


def write_pts(path: Path, pts, n_points=None, header="version: 1"):
    body = "\n".join(f"{x} {y}" for x, y in pts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{header}\nn_points: {n_points or len(pts)}\n{{\n{body}\n}}\n")
    return path


def wflw_line(pts, box, flags, name):
    nums = [*np.asarray(pts).reshape(-1), *box, *flags]
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in nums) + " " + name


def make_wflw(tmp_path, lines):
    ann = tmp_path / "WFLW" / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_test.txt"
    ann.parent.mkdir(parents=True)
    ann.write_text("\n".join(lines) + "\n")
    return ann


def write_aflw(tmp_path, stem, pts, pose_deg, seed=0):
    import scipy.io
    write_image(tmp_path / f"{stem}.jpg", seed=seed)
    pt3d = np.vstack([pts.T, np.zeros((1, 68))])
    pose = np.r_[np.radians(pose_deg), [0, 0, 0, 1.0]][None]
    scipy.io.savemat(str(tmp_path / f"{stem}.mat"), {"pt3d_68": pt3d, "Pose_Para": pose, "pt2d": np.zeros((2, 21))})
