"""Landmark datasets: one abstraction, one reader per on-disk format.

A dataset is named on the command line as `FORMAT:PATH` (or just `synthetic`). Every reader
returns a `LandmarkDataset` of `Sample`s; images are decoded lazily by `load_image`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from flm.errors import DatasetError, SpecError, UsageError
from flm.images import load_image
from flm.spec import scheme_index

log = logging.getLogger("flm")


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

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_points(self) -> int:
        return int(self.samples[0].points.shape[0]) if self.samples else 0

    def has_identities(self) -> bool:
        return bool(self.samples) and all(s.identity for s in self.samples)

    def subset(self, idx, suffix: str) -> "LandmarkDataset":
        return LandmarkDataset(f"{self.name}[{suffix}]", self.scheme, [self.samples[i] for i in idx])

    def mapped(self, scheme: str) -> "LandmarkDataset":
        """The same faces with their points in `scheme` (e.g. WFLW's 98 -> the 68 iBUG points)."""
        try:
            idx = scheme_index(self.scheme, scheme)
        except SpecError as e:
            raise UsageError(f"{self.name} ({self.scheme}, {self.num_points} points): {e}", example="flm train --data wflw:FILE.txt  (98 points -> "
                                                          "68 through the standard map)") from None
        if idx is None:
            return self
        samples = [replace(s, points=s.points[list(idx)]) for s in self.samples]
        return LandmarkDataset(self.name, scheme, samples, self.skipped)

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


def _example() -> str:
    return "udacity:../shared/data/youtube-faces-68  (formats: " + ", ".join(sorted(READERS)) + ")"


def open_dataset(spec: str, skip_bad: bool = False) -> LandmarkDataset:
    """Open a dataset named `FORMAT:PATH` (`synthetic` or `synthetic:N` need no path)."""
    _load_readers()
    fmt, _, path = spec.partition(":")
    if fmt not in READERS:
        raise UsageError(f"unknown dataset format {fmt!r} in {spec!r}", example=_example())
    reader = READERS[fmt][0]
    if fmt != "synthetic":
        if not path:
            raise UsageError(f"dataset {spec!r} needs a path after the colon", example=_example())
        if not Path(path).exists():
            raise UsageError(f"dataset path not found: {path!r} (from {spec!r})", example=_example())
    ds = reader(path, skip_bad=skip_bad)
    ds.name = spec
    if not ds.samples:
        raise DatasetError(path or spec, "dataset holds no usable samples")
    if ds.skipped:
        log.warning("%s: skipped %d bad sample(s); first: %s", spec, len(ds.skipped), ds.skipped[0])
    return ds


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


def open_sources(texts: list[str], scheme: str, skip_bad: bool = False) -> list[tuple[Source, LandmarkDataset]]:
    """Open every `--data` source, decoded and mapped to the model's landmark `scheme`. Every source
    is checked before any is read in full, so a bad one is reported first."""
    sources = [Source.parse(t) for t in texts]
    opened = []
    for src in sources:
        ds = open_dataset(src.spec, skip_bad=skip_bad)
        try:
            ds = ds.mapped(scheme)
        except UsageError as e:
            first = f"; the run's first source is {sources[0].spec!r}" if src is not sources[0] else ""
            raise UsageError(f"--data {src.spec!r} cannot join a {scheme} run: {e.args[0]}{first}",
                             example=e.example) from None
        opened.append((src, ds))
    return [(src, drop_undecodable(ds, skip_bad)) for src, ds in opened]


def drop_undecodable(ds: LandmarkDataset, skip_bad: bool = False, workers: int = 4) -> LandmarkDataset:
    """Decode every image file of `ds` once, before training or evaluation uses it.

    Opening a set reads image headers, not pixels, so a truncated JPEG is only found when it is
    decoded - otherwise deep inside training, in a DataLoader worker that turns the DatasetError
    into a traceback. Without `skip_bad` the first bad image raises here; with it, bad samples
    are dropped, counted in a warning and their reasons added to `ds.skipped`. Generated samples
    (no file) are not decoded. Returns `ds`, changed in place.
    """
    from concurrent.futures import ThreadPoolExecutor

    files = [i for i, s in enumerate(ds.samples) if not callable(s.image)]

    def probe(i):
        try:
            ds.samples[i].load()
        except DatasetError as e:
            return e
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = {i: e for i, e in zip(files, pool.map(probe, files)) if e is not None}
    if not errors:
        return ds
    first = errors[min(errors)]
    if not skip_bad:
        raise DatasetError(first.path, f"{first.problem} (--skip-bad leaves such samples out)", first.line)
    ds.skipped += [str(errors[i]) for i in sorted(errors)]
    ds.samples = [s for i, s in enumerate(ds.samples) if i not in errors]
    log.warning("%s: skipped %d sample(s) whose image cannot be decoded; first: %s", ds.name, len(errors), first)
    if not ds.samples:
        raise DatasetError(ds.name, "dataset holds no usable samples")
    return ds


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


def _load_readers() -> None:
    # The format modules register themselves on import.
    from flm.pipeline.data import formats  # noqa: F401
