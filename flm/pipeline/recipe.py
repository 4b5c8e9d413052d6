"""Recipes: a training run of several stages kept as a TOML file, rerun by one command.

    flm train --recipe recipes/flm-68.toml

A recipe names an output folder and a list of `[[stage]]` tables; each stage is one `flm train`
job whose keys are that command's options with underscores (`data`, `val`, `epochs`, `lr`,
`img_size`, `aug_pose`, ...). `init = "STAGE"` starts a stage from an earlier stage's best.pt
(or `init = "PATH.pt"` from a file); `teacher` takes the same two forms. Top-level keys other
than `out` and `stage` are defaults for every stage. Each stage writes to OUT/NAME; a finished
stage leaves `done.json` there and is skipped on a rerun, and an unfinished one (killed, Ctrl-C)
resumes from its last.pt, so the whole recipe can be stopped and rerun at any point and ends
where an uninterrupted run would.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path

from flm.errors import UsageError, check_at_least
from flm.fileio import atomic_path
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.train import TrainConfig, check_convention_names, check_counts, check_model_options, check_options

_AUG = {"aug_strength": 1.0, "aug_crop": 1.0, "aug_flip": 0.5, "aug_pose": 0.0, "aug_pose_yaw": 50.0}
_CONFIG = {f.name for f in fields(TrainConfig)} - {"augment", "resume", "out"}
_EXAMPLE = 'out = "runs/flm-68"\n[[stage]]\nname = "s1"\ndata = ["udacity:../shared/data/youtube-faces-68"]\nepochs = 30'


def load_recipe(path: Path, max_steps: int | None = None) -> tuple[Path, list[tuple[str, TrainConfig]]]:
    """(output folder, [(stage name, its TrainConfig)]), every stage checked before any runs."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--recipe {path}: file not found", example="flm train --recipe recipes/flm-68.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--recipe {path}: not valid TOML ({e})", example=_EXAMPLE) from None
    stages = doc.get("stage")
    if not isinstance(stages, list) or not stages or "out" not in doc:
        raise UsageError(f"--recipe {path}: expected 'out = \"FOLDER\"' and at least one [[stage]]", example=_EXAMPLE)
    check_at_least("--max-steps", max_steps, 1, example=f"flm train --recipe {path} --max-steps 2")
    base = Path(doc["out"])
    defaults = {k: v for k, v in doc.items() if k not in ("out", "stage")}
    configs, names = [], []
    for k, stage in enumerate(stages, start=1):
        name = str(stage.get("name", f"stage{k}"))
        if name in names:
            raise UsageError(f"--recipe {path}: two stages are named {name!r}", example=_EXAMPLE)
        cfg = _stage_config({**defaults, **stage}, base / name, base, names, f"--recipe {path}, stage {name!r}")
        if max_steps is not None:
            cfg.max_steps = max_steps
        configs.append((name, cfg))
        names.append(name)
    return base, configs


def _stage_config(keys: dict, out: Path, base: Path, earlier: list[str], where: str) -> TrainConfig:
    keys = {k: v for k, v in keys.items() if k != "name"}
    unknown = sorted(set(keys) - _CONFIG - set(_AUG))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(_CONFIG | set(_AUG)))}", example=_EXAMPLE)
    aug = {k: float(keys.pop(k, v)) for k, v in _AUG.items()}
    for k in ("init", "teacher"):
        keys[k] = _checkpoint(k, keys.get(k), base, earlier, where)
    for k, what, example in (("flip_for", "flip probabilities (0-1)", '{ "300w-train" = 0.5 }'),
                             ("flip_shift_for", "label x offsets in pixels", '{ "300w-train" = 1.0 }')):
        if not isinstance(keys.get(k, {}), dict):
            raise UsageError(f"{where}: {k} maps convention names to {what}, got {keys[k]!r}", example=f"{k} = {example}")
    for k in ("data", "val"):
        if k in keys and isinstance(keys[k], str):
            keys[k] = [keys[k]]
    for k in ("heads", "gate", "skip_bad"):
        if not isinstance(keys.get(k, False), bool):
            raise UsageError(f"{where}: {k} is true or false, got {keys[k]!r}", example=f"{k} = true")
    try:
        cfg = TrainConfig(**keys, out=str(out))
    except TypeError as e:
        raise UsageError(f"{where}: {e}", example=_EXAMPLE) from None
    try:  # the same checks as `flm train`'s, told where in the recipe
        check_model_options(cfg.model, cfg.upsample, cfg.trunk_lr, cfg.teacher_weight)
        check_options(cfg.lr, aug["aug_strength"], aug["aug_crop"], aug["aug_flip"], aug["aug_pose"],
                      aug["aug_pose_yaw"], cfg.flip_for, cfg.flip_shift_for)
        check_counts(cfg)
        check_convention_names(cfg)
    except UsageError as e:
        raise UsageError(f"{where}: {e}", example=_EXAMPLE) from None
    cfg.augment = AugmentConfig.from_options(aug["aug_strength"], aug["aug_crop"], aug["aug_flip"],
                                             aug["aug_pose"], aug["aug_pose_yaw"])
    return cfg


def _checkpoint(key: str, value, base: Path, earlier: list[str], where: str) -> str | None:
    """An `init` or `teacher` value: an earlier stage's best.pt, or a checkpoint file."""
    if value is not None and value in earlier:
        return str(base / value / "best.pt")
    if value is not None and not Path(value).is_file():
        raise UsageError(f"{where}: {key} {value!r} is neither an earlier stage ({', '.join(earlier) or 'none'}) "
                         "nor a checkpoint file", example=f'{key} = "s1"')
    return value


def run_recipe(path: Path, run_stage, max_steps: int | None = None) -> list[dict]:
    """Run every stage not yet done with `run_stage(TrainConfig)` (resuming an unfinished one);
    returns the `done.json` records of all stages."""
    base, stages = load_recipe(path, max_steps)
    records = []
    for name, cfg in stages:
        done = Path(cfg.out) / "done.json"
        if done.is_file():
            records.append(json.loads(done.read_text()))
            continue
        last = Path(cfg.out) / "last.pt"
        cfg.resume = str(last) if last.is_file() else None
        summary = run_stage(cfg)
        record = {"stage": name, "best_val_nme": summary["best_val_nme"], "epochs_done": summary["epochs_done"],
                  "wall_s": round(summary["wall_s"], 1), "out": cfg.out}
        with atomic_path(done) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        records.append(record)
    return records
