"""Landmark datasets: one abstraction, one reader per on-disk format.

A dataset is named on the command line as `FORMAT:PATH` (or just `synthetic`). Every reader
returns a `LandmarkDataset` of `Sample`s; images are decoded lazily by `load_image`. The dataset
types and the table of readers live in `base`, which the readers (`formats`) import; this module
opens datasets through that table and hands the types on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flm.errors import DatasetError, UsageError
from flm.pipeline.data import formats  # noqa: F401  (the format readers register themselves in READERS)
from flm.pipeline.data.base import READERS, LandmarkDataset, Sample, Source, check_points, register

__all__ = ["READERS", "LandmarkDataset", "Sample", "Source", "check_points", "drop_undecodable", "open_dataset",
           "open_sources", "register"]

log = logging.getLogger("flm")


def _example() -> str:
    return "udacity:../shared/data/youtube-faces-68  (formats: " + ", ".join(sorted(READERS)) + ")"


def open_dataset(spec: str, skip_bad: bool = False) -> LandmarkDataset:
    """Open a dataset named `FORMAT:PATH` (`synthetic` or `synthetic:N` need no path)."""
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
