"""The `flm` command line: a thin layer over the stage packages.

Each command parses its options, calls one stage function and prints a rich table. Any
`FlmError` becomes one line on stderr plus a correct example and a non-zero exit;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flm.errors import FlmError, UsageError
from flm.ui import console, log_handler, out as out_console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train compact face-landmark models and ship them to the edge.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, check and generate landmark datasets.")
app.add_typer(data_app, name="data")
_state = {"debug": False}
log = logging.getLogger("flm")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")):
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 logs progress
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[log_handler()], force=True)


# --------------------------------------------------------------------------- train / evaluate


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Option("shufflenet-heatmap", "--model", "-m", help="Preset name (see `flm models`)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="FORMAT:PATH; default: the built-in synthetic set."),
    val: Optional[str] = typer.Option(None, "--val", help="FORMAT:PATH for validation; default: identity split of --data."),
    val_fraction: float = typer.Option(0.15, help="Fraction of identities held out when --val is not given."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 30; 4 on the synthetic set)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2e-3),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Input size (multiple of 32); default per preset."),
    width: Optional[float] = typer.Option(None, help="Width multiplier, for presets that have one."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o"),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps"),
    seed: int = typer.Option(0),
    workers: int = typer.Option(1, help="Data-loading worker processes."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (smoke runs)."),
    resume: Optional[Path] = typer.Option(None, help="Continue from a last.pt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from a checkpoint's weights (fine-tune)."),
    aug_flip: float = typer.Option(0.5, "--aug-flip", help="Probability of a horizontal flip (0 for data "
                                   "whose left/right annotations are not mirror-consistent)."),
    aug_strength: float = typer.Option(1.0, "--aug-strength", help="Scale of rotation and the photometric "
                                       "augmentation (colour, grey, blur, noise, erasing): 0 none, 1 the "
                                       "defaults."),
    aug_crop: float = typer.Option(1.0, "--aug-crop", help="Scale of the crop jitter (box edges, zoom, "
                                   "shift), which stands for a face detector's box error: 0 none, 1 the "
                                   "defaults."),
    budget: str = typer.Option("challenge-15mb", help="Refuse presets that cannot fit this budget."),
    ignore_budget: bool = typer.Option(False, "--ignore-budget", help="Train even if the preset exceeds --budget."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad samples instead of stopping."),
    synthetic_n: int = typer.Option(1200, "--synthetic-n", help="Faces in the default synthetic set."),
    nproc: int = typer.Option(1, "--nproc", help="Train in N processes on this machine (runs this command "
                              "under torchrun; --batch-size is per process)."),
):
    """Train a landmark model; writes best.pt, last.pt, metrics.jsonl and PNG reports to --out."""
    if nproc != 1:
        _relaunch_under_torchrun(ctx, nproc)
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    from flm.pipeline.data import drop_undecodable, open_dataset
    from flm.pipeline.evaluate import mean_shape_baseline
    from flm.pipeline.models import build_model, get_preset
    from flm.pipeline.reports import write_training_reports
    from flm.pipeline.augment import AugmentConfig
    from flm.pipeline.train import TrainConfig, train as run_train

    get_preset(model)
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr}", example="flm train --lr 2e-3")
    for name, value in (("--aug-strength", aug_strength), ("--aug-crop", aug_crop)):
        if not (0 <= value <= 3):
            raise UsageError(f"{name} must be between 0 and 3, got {value}", example=f"flm train {name} 0.5")
    if not (0 <= aug_flip <= 1):
        raise UsageError(f"--aug-flip is a probability between 0 and 1, got {aug_flip}",
                         example="flm train --aug-flip 0")
    for name, path in (("--resume", resume), ("--init", init)):
        if path is not None and not path.is_file():  # before any data is read
            raise UsageError(f"{name} {path}: file not found",
                             example=f"flm train {name} runs/train/{'last' if name == '--resume' else 'best'}.pt")
    if not ignore_budget:
        _refuse_over_budget(model, img_size, width, budget)
    spec_str = data or f"synthetic:{synthetic_n}"
    cfg = TrainConfig(model=model, data=spec_str, val=val, val_fraction=val_fraction,
                      epochs=epochs or (30 if data else 4), batch_size=batch_size, lr=lr, img_size=img_size,
                      width=width, out=str(out), device=device, seed=seed, workers=workers,
                      max_steps=max_steps, resume=str(resume) if resume else None,
                      init=str(init) if init else None,
                      augment=replace(AugmentConfig().scaled(aug_strength, aug_crop), flip=aug_flip), skip_bad=skip_bad)
    ds = drop_undecodable(open_dataset(spec_str, skip_bad=skip_bad), skip_bad)
    if val:
        train_ds, val_ds = ds, drop_undecodable(open_dataset(val, skip_bad=skip_bad), skip_bad)
    else:
        train_ds, val_ds = ds.split_by_identity(val_fraction, seed)
    spec = build_model(model, img_size, {"width": width} if width else None).spec
    baseline = mean_shape_baseline(train_ds, val_ds, spec)
    log.info("mean-shape baseline on the validation set: NME %.2f %%", 100 * baseline)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(cfg.epochs)), BarColumn(),
                  TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}  val NME {task.fields[nme]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                  disable=rank != 0) as bar:
        task = bar.add_task("train", total=None, epoch=1, loss=0.0, nme="-")

        def progress(epoch, step, steps, loss, val_nme):
            fields = {"epoch": epoch + 1, "loss": loss or 0.0}
            if val_nme is not None:
                fields["nme"] = f"{100 * val_nme:.2f} %"
            bar.update(task, completed=step, total=steps, **fields)

        summary = run_train(cfg, train_ds, val_ds, progress)
    summary["baseline_nme"] = baseline
    if rank != 0:  # under torchrun only rank 0 writes and reports
        raise typer.Exit(130 if summary["stopped"] == "signal" else 0)
    write_training_reports(Path(out), val_ds)
    if summary["stopped"] == "signal":
        console.print(f"[yellow]stopped by signal; resume with: flm train --resume {out / 'last.pt'} ...")
        raise typer.Exit(130)
    out_console.print(f"best validation NME {100 * summary['best_val_nme']:.2f} % "
                      f"(mean-shape baseline {100 * baseline:.2f} %), {summary['wall_s']:.0f} s -> {out / 'best.pt'}")


def _relaunch_under_torchrun(ctx: typer.Context, nproc: int) -> None:
    """`flm train --nproc N`: run this same command in N processes on this machine with torchrun."""
    import subprocess

    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: expected a number of processes >= 1",
                         example="flm train --nproc 2 --data udacity:DIR")
    if "RANK" in os.environ:
        raise UsageError("--nproc launches torchrun itself; this process already runs under torchrun",
                         example="torchrun --nproc-per-node 2 -m flm.cli train --data udacity:DIR")
    args = [f"--{name}" for name in ("debug", "quiet") if ctx.parent.params.get(name)] + ["train"]
    for p in ctx.command.params:
        value = ctx.params[p.name]
        if p.name == "nproc" or value is None or value is False:
            continue
        args += [p.opts[0]] if value is True else [p.opts[0], str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "flm.cli", *args]
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    while proc.returncode is None:
        try:
            proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and its workers too: they save and stop
            pass
    raise typer.Exit(proc.returncode)


def _refuse_over_budget(model: str, img_size, width, budget: str) -> None:
    try:
        from flm.budgets import preset_fits
    except ImportError:  # budgets not installed in this build
        return
    ok, message = preset_fits(model, img_size=img_size, width=width, budget=budget)
    if not ok:
        raise UsageError(message, example=f"flm train --model {model} --ignore-budget")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A best.pt / last.pt."),
    data: str = typer.Option(..., "--data", "-d", help="FORMAT:PATH"),
    norm: str = typer.Option("inter-ocular", help="inter-ocular|inter-pupil|bbox"),
    threshold: float = typer.Option(0.08, help="Failure threshold (NME fraction) and CED/AUC limit."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON."),
    ced: Optional[Path] = typer.Option(None, "--ced", help="Write the CED curve as PNG."),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
    split: str = typer.Option("all", help="all | val | train: the identity split `flm train` makes "
                              "(with --val-fraction and --seed), to score only the held-out people."),
    val_fraction: float = typer.Option(0.15, help="Fraction of identities held out (with --split)."),
    seed: int = typer.Option(0, help="Seed of the identity split (with --split)."),
):
    """NME mean/median, failure rate and CED AUC on a dataset (crops from the landmark box)."""
    from flm.pipeline.checkpoint import load_model
    from flm.pipeline.data import drop_undecodable, open_dataset
    from flm.pipeline.evaluate import evaluate as run_eval, write_report

    if norm not in ("inter-ocular", "inter-pupil", "bbox"):
        raise UsageError(f"unknown --norm {norm!r}", example="flm evaluate best.pt --data udacity:DIR --norm inter-ocular")
    if split not in ("all", "val", "train"):
        raise UsageError(f"unknown --split {split!r}", example="flm evaluate best.pt --data udacity:DIR --split val")
    model = load_model(checkpoint)
    ds = drop_undecodable(open_dataset(data, skip_bad=skip_bad), skip_bad)
    if split != "all":
        ds = ds.split_by_identity(val_fraction, seed)[split == "val"]
    result = run_eval(model, ds, norm=norm, threshold=threshold)
    write_report(result, json_out, ced)
    t = Table(title=f"{checkpoint} on {ds.name}")
    for col in ("images", f"NME mean ({norm})", "NME median", f"failure > {threshold:.0%}", "AUC"):
        t.add_column(col, justify="right")
    t.add_row(str(result["count"]), f"{100 * result['nme_mean']:.2f} %", f"{100 * result['nme_median']:.2f} %",
              f"{100 * result['failure_rate']:.2f} %", f"{result['auc']:.4f}")
    out_console.print(t)
    if "yaw_bins" in result:
        out_console.print("yaw bins: " + ", ".join(f"{k}: {100 * v:.2f} %" for k, v in result["yaw_bins"].items()
                                                   if v is not None)
                          + f"; mean {100 * result['yaw_balanced_nme']:.2f} %")


# --------------------------------------------------------------------------- stage commands

# Each stage package defines its own commands in `<stage>/commands.py` with a
# `register(app, data_app)` function; a stage that is not there simply has no commands.
STAGE_COMMANDS = ("flm.pipeline.data.commands", "flm.budgets.commands",
                  "flm.exporters.commands", "flm.runtime.commands")


def _register_stage_commands() -> None:
    import importlib

    for name in STAGE_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(app, data_app)


_register_stage_commands()


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # in standalone_mode=False, `raise typer.Exit(130)` (and Ctrl-C) come back as the return value
        code = app(args=argv, standalone_mode=False)
    except FlmError as e:
        if debug:
            raise
        from rich.markup import escape  # messages quote values like "[nan, 1.0]": not markup

        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        if e.example:
            console.print(f"  example: {escape(e.example)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("[red]aborted")
        return 130
    except typer.TyperException as e:  # usage errors (bad option, missing argument) in standalone_mode=False
        if debug:
            raise
        e.show() if hasattr(e, "show") else console.print(f"[red]error:[/] {e}")
        return e.exit_code
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
