"""Readers for every on-disk landmark format flm accepts. Each registers under its FORMAT name."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from flm.errors import DatasetError
from flm.pipeline.data import LandmarkDataset, Sample, check_points, register


def _identity_from_name(name: str) -> str:
    """`Luis_Fonsi_921.jpg` -> `Luis_Fonsi` (YouTube Faces / Udacity naming)."""
    return re.sub(r"_\d+$", "", Path(name).stem)


@register("udacity", "udacity:DIR (DIR/landmarks.csv + DIR/images/)",
          "Udacity keypoints CSV: file name + x0,y0..x67,y67; identity from the file name")
def read_udacity(path: str, skip_bad: bool = False) -> LandmarkDataset:
    root = Path(path)
    csv_path = root / "landmarks.csv" if root.is_dir() else root
    if not csv_path.is_file():
        raise DatasetError(csv_path, "Udacity CSV not found (expected DIR/landmarks.csv or a .csv file)")
    img_dir = csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent
    samples, skipped, seen = [], [], set()
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DatasetError(csv_path, f"not UTF-8 text (byte {e.start})") from None
    for lineno, row in enumerate(rows, start=1):
        if not row or (lineno == 1 and _is_header(row)):
            continue  # blank line or header
        try:
            if len(row) != 137:
                raise DatasetError(csv_path, f"expected a file name and 136 numbers, got {len(row) - 1} "
                                             "values", lineno)
            name = row[0].strip()
            if name in seen:
                raise DatasetError(csv_path, f"duplicate row for image {name!r}", lineno)
            try:
                values = np.array([float(v) for v in row[1:]])
            except ValueError:
                bad = next(v for v in row[1:] if not _is_number(v))
                raise DatasetError(csv_path, f"not a number: {bad!r}", lineno) from None
            pts = check_points(values.reshape(-1, 2), 68, csv_path, lineno)
            seen.add(name)
            samples.append(Sample(img_dir / name, pts, identity=_identity_from_name(name), line=lineno))
        except DatasetError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    return LandmarkDataset(f"udacity:{path}", "ibug68", samples, skipped)


def _is_header(row: list[str]) -> bool:
    # pandas writes ",0,1,...,135" (an empty first cell and column indices) as the header
    return not row[0].strip() or row[1:] == [str(i) for i in range(len(row) - 1)] \
        or not all(_is_number(v) for v in row[1:])


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
