"""The models flm ships, by name: `FaceLandmarker.create("flm-68")`, `flm detect --model flm-68`,
`flm models --shipped [--json]`.

A shipped model is an exported flm ONNX file in `flm/assets/`; its name is the file's name
without `.onnx`. Everything a listing says about it besides its name, path and size (input
size, points, scheme, output) is read from the file's own spec (`flm.spec` in its ONNX
metadata, read as the landmarker reads it), so shipping another model takes only its file.
Which one `FaceLandmarker.create()` uses when given no model is declared once: `DEFAULT_NAME`.

How a model argument is read (`resolve_model`): an existing file is that file; a string with
no path separator and no `.onnx` suffix is a shipped model's name (unknown: a `UsageError`
listing the names); a `.pt` training checkpoint is a `UsageError` saying to export it first;
anything else is a path, and opening it reports a missing or foreign file (`ModelFileError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flm.bundled import ASSETS, DEFAULT_NAME, SUFFIX, is_model_name, shipped_paths  # noqa: F401 (re-exported)
from flm.errors import ModelFileError, UsageError
from flm.runtime.modelfile import open_session, read_spec
from flm.spec import ModelSpec


@dataclass(frozen=True)
class ShippedModel:
    """One model in `flm/assets`: its name, absolute path, file size and the spec inside it."""

    name: str
    path: Path
    bytes: int
    spec: ModelSpec
    default: bool

    def to_dict(self) -> dict:
        s = self.spec
        return {"name": self.name, "path": str(self.path), "default": self.default, "input_size": s.input_size,
                "points": s.num_points, "scheme": s.scheme, "output": s.output, "preset": s.preset,
                "conventions": list(s.conventions), "gated": s.gated,
                "bytes": self.bytes, "mb": round(self.bytes / 1e6, 2)}


def shipped_models(assets: Path | None = None) -> list[ShippedModel]:
    """The shipped models, by name, each described by its own file (a file without a valid flm
    spec is a broken install: its `ModelFileError` / `SpecError` is raised)."""
    models = []
    for name, path in shipped_paths(assets).items():
        spec = read_spec(open_session(path, threads=1), str(path))
        models.append(ShippedModel(name, path, path.stat().st_size, spec, name == DEFAULT_NAME))
    return models


def resolve_model(model, example: str = "FaceLandmarker.create({!r})", assets: Path | None = None) -> Path:
    """The file a model argument means: None -> the default shipped model; a shipped model's
    name -> its file; an existing file or anything that reads as a path -> that path (opening
    it reports a missing or foreign file). A name flm does not ship raises a one-line
    `UsageError` listing the names, with `example` (a format string taking a name) filled in."""
    if model is None:
        names = shipped_paths(assets)
        if DEFAULT_NAME not in names:
            raise ModelFileError(Path(assets or ASSETS) / f"{DEFAULT_NAME}{SUFFIX}",
                                 "the default model is not bundled with this install of flm; pass "
                                 "model='path/to/model.onnx' (an `flm export` output)")
        return names[DEFAULT_NAME]
    if isinstance(model, str) and is_model_name(model) and not Path(model).is_file():
        names = shipped_paths(assets)
        if model in names:
            return names[model]
        known = ", ".join(f"{n} (default)" if n == DEFAULT_NAME else n for n in names) or "none in this install"
        good = DEFAULT_NAME if DEFAULT_NAME in names else next(iter(names), None)
        fix = f", e.g. {example.format(good)}" if good else ""
        raise UsageError(f"unknown model {model!r}: not a file, nor a model flm ships (shipped: {known}); "
                         f"give a shipped model's name or a path to an .onnx file{fix}")
    if Path(model).suffix.lower() == ".pt":
        raise UsageError(f"{model}: a training checkpoint; the runtime runs exported files (.onnx)",
                         example=f"flm export {model} --target onnx --out exported/, then {example.format('exported/model.onnx')}")
    return Path(model)
