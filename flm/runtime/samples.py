"""Sample photographs to try `flm detect` on: real faces, in the public domain, from an installed package.

The photo is NASA's portrait of astronaut Eileen Collins ("No known copyright restrictions,
released into the public domain"), which scikit-image ships inside its wheel as
`skimage.data.astronaut()`: it is read from the installed package, never downloaded, so the
demo works offline and without `../shared`. scikit-image is the `demo` extra
(`pip install 'flm[demo]'`); it is imported here only when photos are written, never by
`import flm.runtime`.

Other photographs of people in scikit-image's wheel were considered: `camera()` (CC0) shows a
man in near-profile behind a tripod (OpenCV's frontal Haar cascade finds no face in it), and
`lfw_subset()` holds 25x25 px crops from Labeled Faces in the Wild, whose news photos are not
public domain. Everything else it ships (cat, coffee, rocket, ...) is not a face.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from flm.errors import UsageError
from flm.fileio import atomic_path, log_written

SAMPLE_EXAMPLE = "flm sample-photos --out runs/demo/photos && flm detect runs/demo/photos --out runs/demo/detections-real"
TILT_DEGREES = 12.0  # the second photo's roll: enough to show in the pose axes, within Haar's reach


def astronaut_rgb() -> np.ndarray:
    """(512, 512, 3) RGB uint8: the astronaut portrait from scikit-image's wheel."""
    try:
        from skimage import data
    except ImportError:
        raise UsageError("the sample photos come from scikit-image, which is not installed; install it with: "
                         "pip install 'flm[demo]'  (or pip install scikit-image)", example=SAMPLE_EXAMPLE) from None
    return np.ascontiguousarray(data.astronaut()[:, :, :3])


def sample_photos() -> dict[str, np.ndarray]:
    """File name -> RGB uint8 image: the portrait as shipped, and a mirrored copy turned by
    `TILT_DEGREES` (the head rolls; the borders are filled by reflection, so no black corners)."""
    rgb = astronaut_rgb()
    h, w = rgb.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), TILT_DEGREES, 1.0)
    tilted = cv2.warpAffine(np.ascontiguousarray(rgb[:, ::-1]), turn, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    return {"astronaut.jpg": rgb, "astronaut-mirrored-tilted.jpg": tilted}


def write_sample_photos(out_dir, quality: int = 95) -> list[Path]:
    """Write the sample photos as JPEG into `out_dir` (created if needed); returns their paths."""
    out_dir = Path(out_dir)
    written = []
    for name, rgb in sample_photos().items():
        started = time.perf_counter()
        dest = out_dir / name
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise UsageError(f"OpenCV cannot encode {name} as JPEG")
        with atomic_path(dest, suffix=".jpg") as tmp:
            tmp.write_bytes(buf.tobytes())
        log_written(dest, started)
        written.append(dest)
    return written
