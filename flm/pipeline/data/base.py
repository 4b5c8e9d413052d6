"""What every landmark dataset is made of, whatever its on-disk format: `Sample`s in a
`LandmarkDataset`, the `--data` entry that names one (`Source`), the check every reader applies to
a face's points (`check_points`), and the table of format readers (`READERS`, filled by
`register` as `flm.pipeline.data.formats` is imported).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from flm.errors import DatasetError, SpecError, UsageError
from flm.images import load_image
from flm.spec import scheme_index


@dataclass
class Sample:
    image: Path | Callable[[], np.ndarray]  # a file, or a renderer (synthetic faces)
    points: np.ndarray  # (K, 2) float32, image pixels, pixel centres at integers
    box: np.ndarray | None = None  # (x0, y0, x1, y1) if the format gives one
    identity: str | None = None
    line: int | None = None  # where in the annotation file this sample came from
    meta: dict = field(default_factory=dict)  # e.g. {"yaw": 12.5} for AFLW2000-3D

    def load(self) -> np.ndarray:
        if callable(self.image):
            return self.image()
        return load_image(self.image, self.line)


@dataclass
class LandmarkDataset:
    name: str  # the FORMAT:PATH it came from
    scheme: str  # "ibug68", "wflw98", ...
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # reasons, when read with skip_bad
    norm: str = "inter-ocular"  # the NME normaliser of the set's own protocol (AFLW2000-3D: "bbox")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_points(self) -> int:
        return int(self.samples[0].points.shape[0]) if self.samples else 0

    def has_identities(self) -> bool:
        return bool(self.samples) and all(s.identity for s in self.samples)

    def subset(self, idx, suffix: str) -> "LandmarkDataset":
        return LandmarkDataset(f"{self.name}[{suffix}]", self.scheme, [self.samples[i] for i in idx], norm=self.norm)

    def mapped(self, scheme: str) -> "LandmarkDataset":
        """The same faces with their points in `scheme` (e.g. WFLW's 98 -> the 68 iBUG points)."""
        try:
            idx = scheme_index(self.scheme, scheme)
        except SpecError as e:
            raise UsageError(f"{self.name} ({self.scheme}, {self.num_points} points): {e}",
                             example="flm train --data wflw:FILE.txt  (98 points -> 68 through the standard map)") from None
        if idx is None:
            return self
        samples = [replace(s, points=s.points[list(idx)]) for s in self.samples]
        return LandmarkDataset(self.name, scheme, samples, self.skipped, self.norm)

    def split_by_identity(self, val_fraction: float = 0.15, seed: int = 0):
        """(train, val) with whole identities held out, chosen by a salted hash of the name.

        A hash, not a shuffle, so a person lands on the same side whatever else is in the
        set; at least `val_fraction` of the identities are held out.
        """
        if not self.has_identities():
            raise DatasetError(self.name, "cannot split by identity: some samples have no identity; "
                                          "pass a separate --val dataset")
        ids = sorted({s.identity for s in self.samples})
        key = lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
        n_val = max(1, int(np.ceil(val_fraction * len(ids))))
        val_ids = set(sorted(ids, key=key)[:n_val])
        tr = [i for i, s in enumerate(self.samples) if s.identity not in val_ids]
        va = [i for i, s in enumerate(self.samples) if s.identity in val_ids]
        return self.subset(tr, "train"), self.subset(va, "val")


# FORMAT name -> (reader(path, skip_bad) -> LandmarkDataset, example path, one-line description)
READERS: dict[str, tuple[Callable[..., LandmarkDataset], str, str]] = {}


def register(name: str, example: str, description: str):
    def deco(fn):
        READERS[name] = (fn, example, description)
        return fn
    return deco


@dataclass(frozen=True)
class Source:
    """One `--data` entry: `FORMAT:PATH[@WEIGHT]`. Its faces are drawn WEIGHT times per epoch (2 = each
    face twice, 0.5 = a random half) and follow the annotation convention named `convention` (the
    folder or file name), which gets its own output head when several conventions train together."""

    spec: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Source":
        spec, at, weight = text.rpartition("@") if "@" in text else (text, "", "")
        if at:
            try:
                w = float(weight)
            except ValueError:
                w = float("nan")
            if not (np.isfinite(w) and w > 0):
                raise UsageError(f"--data {text!r}: the weight after '@' must be a positive number, got "
                                 f"{weight!r}", example="flm train --data ibug-pts:../shared/data/300w-train@2")
        return cls(spec, w if at else 1.0)

    @property
    def convention(self) -> str:
        fmt, _, path = self.spec.partition(":")
        if fmt == "synthetic":
            return fmt
        return Path(path.rstrip("/")).stem if path and Path(path).stem else fmt


def check_points(points: np.ndarray, expected: int, path, line: int | None,
                 image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a (K, 2) point array; raise DatasetError naming the file and line."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (expected, 2):
        raise DatasetError(path, f"expected {expected} points ({2 * expected} numbers), got "
                                 f"{pts.size} numbers", line)
    if not np.isfinite(pts).all():
        bad = int(np.argwhere(~np.isfinite(pts).all(axis=1))[0, 0])
        raise DatasetError(path, f"point {bad} is not finite ({pts[bad].tolist()})", line)
    if (pts < -0.5 * max(1.0, np.ptp(pts))).any():
        raise DatasetError(path, "points lie far outside the image (large negative coordinates)", line)
    if image_size is not None:
        w, h = image_size
        if (pts[:, 0] > 1.5 * w).any() or (pts[:, 1] > 1.5 * h).any():
            raise DatasetError(path, f"points lie far outside the {w}x{h} image", line)
    if np.ptp(pts[:, 0]) < 1e-6 or np.ptp(pts[:, 1]) < 1e-6:
        raise DatasetError(path, "all points collapse onto a line or a point", line)
    return pts.astype(np.float32)
