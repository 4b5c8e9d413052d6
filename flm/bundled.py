"""The model files flm ships in `flm/assets/`, by name (a file's name without `.onnx`), and which
one is the default. Names and paths only, no model runtime, so every stage can refer to them:
`flm.runtime.shipped` opens and lists them, `flm check-budget NAME` measures one.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_NAME = "flm-68-distilled"  # the model FaceLandmarker.create() and flm detect use when given none
SUFFIX = ".onnx"


def shipped_paths(assets: Path | None = None) -> dict[str, Path]:
    """Name -> absolute path of every model file shipped in `assets` (default: flm/assets), by name."""
    folder = Path(assets or ASSETS)
    if not folder.is_dir():
        return {}
    named = {p.name[: -len(SUFFIX)]: p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file()}
    return {name: named[name].resolve() for name in sorted(named)}


def is_model_name(model: str) -> bool:
    """Whether a model argument reads as a name rather than a path: no path separator, no `.onnx`."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(s in model for s in seps) and not model.lower().endswith(SUFFIX)
