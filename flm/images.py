"""Image decoding shared by data loaders and the runtime (numpy + OpenCV only).

Every image flm touches becomes an RGB uint8 (H, W, 3) array here, whatever it was on disk
(gray, BGRA, 16-bit, palette) — or a clear error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from flm.errors import DatasetError

# Decompression-bomb guard: OpenCV refuses images above this many pixels before decoding.
MAX_PIXELS = 1 << 28  # 268 M pixels, e.g. 16384 x 16384
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))


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
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise DatasetError(path, "cannot decode image (truncated, not an image, or larger than "
                                 f"{MAX_PIXELS} pixels)", line)
    return to_rgb_uint8(img, str(path), bgr=True)
