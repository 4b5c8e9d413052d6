"""Image decoding shared by data loaders and the runtime (numpy + OpenCV only).

Every image flm touches becomes an RGB uint8 (H, W, 3) array here, whatever it was on disk
(gray, BGRA, 16-bit, palette) — or a clear error naming the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

# Decompression-bomb guard. OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first
# imported, so the variable only helps if it is set before that; `load_image` therefore also
# reads the size from the file header itself (PNG, JPEG, GIF, BMP, WebP) and refuses big images
# before OpenCV allocates anything, whatever was imported first.
MAX_PIXELS = 1 << 28  # 268 M pixels, e.g. 16384 x 16384
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

from flm.errors import DatasetError  # noqa: E402


def to_rgb_uint8(image: np.ndarray, source: str = "image", bgr: bool = False) -> np.ndarray:
    """Any gray / RGB / BGR / RGBA / BGRA array, uint8 / uint16 / float (0..1) -> RGB uint8.

    `bgr=True` says a 3- or 4-channel array is in OpenCV's BGR(A) order.
    """
    a = np.asarray(image)
    if a.size == 0 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{source}: expected an H x W, H x W x 1/3/4 image, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{source}: image contains NaN or inf values")
        # floats are taken on the 0..1 scale, the convention of skimage / torchvision
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{source}: unsupported image dtype {a.dtype}")
    if a.ndim == 2 or a.shape[2] == 1:
        return cv2.cvtColor(a.reshape(a.shape[0], a.shape[1]), cv2.COLOR_GRAY2RGB)
    if a.shape[2] == 4:
        return cv2.cvtColor(a, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(a)


def load_image(path, line: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8, or raise DatasetError naming the file (and the row)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file not found", line)
    if path.stat().st_size == 0:
        raise DatasetError(path, "image file is empty (0 bytes)", line)
    # imdecode from bytes copes with non-ASCII paths, which cv2.imread does not on every platform
    data = np.fromfile(str(path), dtype=np.uint8)
    size = header_size(memoryview(data))
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise DatasetError(path, f"image is {size[0]}x{size[1]}, more than the {MAX_PIXELS} pixels "
                                 "allowed (decompression-bomb guard)", line)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise DatasetError(path, "cannot decode image (truncated, not an image, or larger than "
                                 f"{MAX_PIXELS} pixels)", line)
    return to_rgb_uint8(img, str(path), bgr=True)


def header_size(head) -> tuple[int, int] | None:
    """(width, height) from the first bytes (bytes or memoryview) of a PNG, JPEG, GIF, BMP or
    WebP file, without decoding; None for other formats or when `head` is too short to tell."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", head[16:24]) if head[12:16] == b"IHDR" else None
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head[:2] == b"BM":
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 core header
                return struct.unpack("<HH", head[18:22])
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            kind = head[12:16]
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", head[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if kind == b"VP8L":
                bits = struct.unpack("<I", head[21:25])[0]
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8X":
                return (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
            return None
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(head)
    except struct.error:  # too short
        return None
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None  # not at a marker: corrupt, let the decoder say so
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", head[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if i + 9 > len(head):
                return None
            h, w = struct.unpack(">HH", head[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def image_size(path) -> tuple[int, int] | None:
    """(width, height) of an image file from its header (no decoding), or None if unknown."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = header_size(head)
        if size is None and head[:2] == b"\xff\xd8" and len(head) == 1 << 16:
            size = header_size(head + f.read())  # a JPEG with big metadata segments first
    return size
