"""The `flm` command line: a thin layer over the stage packages.

Each command parses its options, calls one stage function and prints a rich table. Any
`FlmError` becomes one line on stderr plus a correct example and a non-zero exit;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, get_args

import typer
import typer.main
from rich.table import Table

from flm.errors import FlmError, UsageError
from flm.ui import console, log_handler, out as out_console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train compact face-landmark models and ship them to the edge.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, check and generate landmark datasets.")
app.add_typer(data_app, name="data")
_state = {"debug": False}
DATA_HELP = ("FORMAT:PATH\\[@WEIGHT], repeatable (sources mixed, each drawn WEIGHT x its size per epoch); "
             "default: the built-in synthetic set.")
VAL_HELP = ("FORMAT:PATH scored every epoch, or 'split' (hold out 15 % of the people / photos of every --data); "
            "repeatable; default: split.")
SELECT_HELP = ("The validation set (by name) whose NME picks best.pt, 'mean' over all of them, or 'last' "
               "(best.pt is the last epoch: no set picks it).")
FLIP_SHIFT_HELP = ("NAME=PX: the x offset of one convention's labels from their mirror-consistent place "
                   "(image pixels), kept through flips; repeatable (model card: 300w-train about 1).")
NPROC_HELP = "Train in N processes on this machine (runs this command under torchrun; --batch-size is per process)."
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
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    val: Optional[list[str]] = typer.Option(None, "--val", help=VAL_HELP),
    select: str = typer.Option("mean", "--select", help=SELECT_HELP),
    heads: bool = typer.Option(True, "--heads/--one-head", help="One output head per annotation convention "
                               "(each --data folder name) when the sources follow several."),
    gate: bool = typer.Option(False, "--gate", help="With --heads: learn which convention a face's source follows."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Run the stages of a recipe TOML "
                                          "(resumes a stage left unfinished); other options are ignored."),
    val_fraction: float = typer.Option(0.15, help="Fraction of identities held out by --val split."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 30; 4 on the synthetic set)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2e-3),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Input size (multiple of 32); default per preset."),
    width: Optional[float] = typer.Option(None, help="Width multiplier, for presets that have one."),
    head: Optional[str] = typer.Option(None, "--head", help="Heatmap head channels C1,C2 (default 192,128)."),
    upsample: Optional[str] = typer.Option(None, "--upsample", help="Its x2 steps: deconv (default) or light."),
    trunk_lr: float = typer.Option(1.0, "--trunk-lr", help="Trunk learning rate, a fraction of --lr (0: frozen)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A trained checkpoint whose heatmaps it learns too (any input size)."),
    teacher_weight: float = typer.Option(1.0, "--teacher-weight", help="Weight of --teacher's term in the loss."),
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
                                       "augmentation (colour, grey, blur, noise, erasing): 0 none, 1 the defaults."),
    aug_crop: float = typer.Option(1.0, "--aug-crop", help="Scale of the crop jitter (box edges, zoom, shift), "
                                   "which stands for a face detector's box error: 0 none, 1 the defaults."),
    aug_flip_for: Optional[list[str]] = typer.Option(None, "--aug-flip-for", help="NAME=P: flip probability "
                                                     "for the faces of one convention (a --data folder name), "
                                                     "e.g. 300w-train=0.5 beside --aug-flip 0; repeatable."),
    aug_flip_shift_for: Optional[list[str]] = typer.Option(None, "--aug-flip-shift-for", help=FLIP_SHIFT_HELP),
    aug_pose: float = typer.Option(0.0, "--aug-pose", help="Probability of turning a face out of plane (a generic "
                                   "3-D face fitted to its points, up to --aug-pose-yaw degrees)."),
    aug_pose_yaw: float = typer.Option(50.0, "--aug-pose-yaw", help="Largest added yaw of --aug-pose, degrees."),
    budget: str = typer.Option("challenge-15mb", help="Refuse presets that cannot fit this budget."),
    ignore_budget: bool = typer.Option(False, "--ignore-budget", help="Train even if the preset exceeds --budget."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad samples instead of stopping."),
    synthetic_n: int = typer.Option(1200, "--synthetic-n", help="Faces in the default synthetic set."),
    nproc: int = typer.Option(1, "--nproc", help=NPROC_HELP),
):
    """Train a landmark model; writes best.pt, last.pt, metrics.jsonl and PNG reports to --out."""
    if recipe is not None:
        return _run_recipe(recipe, max_steps)
    if nproc != 1:
        _relaunch_under_torchrun(ctx, nproc)
    from flm.pipeline.train import config_from_options

    cfg = config_from_options(ctx.params)
    if not ignore_budget:
        _refuse_over_budget(model, img_size, width, cfg.head, cfg.upsample, budget)
    _train_progress(cfg)


def _run_recipe(recipe: Path, max_steps: int | None) -> None:
    from flm.pipeline.recipe import run_recipe

    for record in run_recipe(recipe, _train_progress, max_steps):
        out_console.print(f"stage {record['stage']}: best validation NME {100 * record['best_val_nme']:.2f} %, "
                          f"{record['epochs_done']} epochs, {record['wall_s']:.0f} s -> {record['out']}",
                          highlight=False, soft_wrap=True)


def _train_progress(cfg) -> dict:
    """Run one training job with a progress bar on a terminal and one plain line per epoch always."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from flm.pipeline.train import run

    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    with Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(cfg.epochs)), BarColumn(),
                  TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                  disable=rank != 0 or not console.is_terminal) as bar:
        task = bar.add_task("train", total=None, epoch=1, loss=0.0)

        def progress(epoch, step, steps, loss, rec):
            bar.update(task, completed=step, total=steps, epoch=epoch + 1, loss=loss or 0.0)
            if rec is not None and rank == 0:
                sets = "  ".join(f"{k} {100 * v:.2f} %" for k, v in rec["val"].items())
                out_console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {rec['train_loss']:.4f}  val NME: {sets}"
                                  f"  (selects: {100 * rec['val_nme']:.2f} %)  {rec['time_s']:.0f} s",
                                  highlight=False, soft_wrap=True)

        summary = run(cfg, progress)
    if rank != 0:  # under torchrun only rank 0 writes and reports
        raise typer.Exit(130 if summary["stopped"] == "signal" else 0)
    out = Path(cfg.out)
    if summary["stopped"] == "signal":
        console.print(f"[yellow]stopped by signal; resume with: flm train --resume {out / 'last.pt'} ..."
                      if summary["epochs_done"] < min(cfg.epochs, cfg.stop_epoch or cfg.epochs) else
                      f"[yellow]stopped by signal after the last epoch: the run is complete -> {out / 'best.pt'}")
        raise typer.Exit(130)
    base = ", ".join(f"{k} {100 * b:.2f} %" for k, b in summary["baseline"].items())
    out_console.print(f"best validation NME {100 * summary['best_val_nme']:.2f} % (mean-shape baseline: {base}), "
                      f"{summary['wall_s']:.0f} s -> {out / 'best.pt'}", highlight=False, soft_wrap=True)
    return summary


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
        if p.name == "nproc" or value is None or (value is False and not p.secondary_opts):
            continue
        if isinstance(value, bool):
            args.append(p.opts[0] if value else p.secondary_opts[0])
        else:
            args += [a for v in (value if isinstance(value, (list, tuple)) else [value]) for a in (p.opts[0], str(v))]
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


def _refuse_over_budget(model: str, img_size, width, head, upsample, budget: str) -> None:
    try:
        from flm.budgets import preset_fits
    except ImportError:  # budgets not installed in this build
        return
    ok, message = preset_fits(model, img_size=img_size, width=width, budget=budget, head=head, upsample=upsample)
    if not ok:
        raise UsageError(message, example=f"flm train --model {model} --ignore-budget")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A best.pt / last.pt."),
    data: list[str] = typer.Option(..., "--data", "-d", help="FORMAT:PATH, repeatable: one table row each."),
    norm: str = typer.Option("auto", help="auto (the set's own protocol: bbox for AFLW2000-3D, else "
                             "inter-ocular) | inter-ocular | inter-pupil | bbox"),
    threshold: float = typer.Option(0.08, help="Failure threshold (NME fraction) and CED/AUC limit; "
                                    "10 % is always reported beside it."),
    convention: str = typer.Option("auto", help="Which output head of a model of several annotation "
                                   "conventions: auto (a gated model's own answer; else the head named like "
                                   "the set's folder, else the first) or a convention's name."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full results as JSON."),
    ced: Optional[Path] = typer.Option(None, "--ced", help="Write the CED curve of the first set as PNG."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable samples (counted in the log) instead of stopping."),
    split: str = typer.Option("all", help="all | val | train: the identity / photo split `flm train` makes "
                              "(with --val-fraction and --seed), to score only the held-out faces."),
    val_fraction: float = typer.Option(0.15, help="Fraction of identities held out (with --split)."),
    seed: int = typer.Option(0, help="Seed of the identity split (with --split)."),
):
    """NME mean/median, failure rate and CED AUC (at --threshold and 10 %) per dataset, crops from the landmark box."""
    from flm.pipeline.checkpoint import load_model
    from flm.pipeline.evaluate import check_evaluation_options, evaluate_sets
    from flm.pipeline.reports import write_report

    check_evaluation_options(norm, split, threshold, val_fraction, json_out, ced)
    model = load_model(checkpoint)
    results = evaluate_sets(model, data, norm=norm, threshold=threshold, convention=convention, skip_bad=skip_bad,
                            split=split, val_fraction=val_fraction, seed=seed)
    write_report(results[0] if len(results) == 1 else results, json_out, None)
    if ced:
        write_report(results[0], None, ced)
    out_console.print(_evaluation_table(checkpoint, results, threshold))


def _evaluation_table(checkpoint, results: list[dict], threshold: float) -> Table:
    t = Table(title=f"{checkpoint}")
    for col in ("dataset", "images", "norm", "NME mean", "NME median", f"FR {threshold:.0%}", f"AUC {threshold:.0%}",
                "FR 10%", "AUC 10%", "yaw 0-30 / 30-60 / 60-90 (mean)"):
        t.add_column(col, justify="left" if col in ("dataset", "norm") else "right", no_wrap=col == "dataset")
    for r in results:
        bins = r.get("yaw_bins")
        yaw = ("-" if not bins else " / ".join("-" if v is None else f"{100 * v:.2f}" for v in bins.values())
               + f" ({100 * r['yaw_balanced_nme']:.2f} %)")
        t.add_row(r["dataset"], str(r["count"]), r["norm"], f"{100 * r['nme_mean']:.2f} %",
                  f"{100 * r['nme_median']:.2f} %", f"{100 * r['failure_rate']:.2f} %", f"{r['auc']:.4f}",
                  f"{100 * r['failure_rate_10']:.2f} %", f"{r['auc_10']:.4f}", yaw)
    return t


def _budget_help() -> str:
    try:
        from flm.budgets import budget_names
    except ImportError:  # budgets not installed in this build
        return "Budget for the 'fits' column."
    return f"Budget for the 'fits' column: {', '.join(budget_names())}."


@app.command()
def models(
    budget: str = typer.Option("challenge-15mb", "--budget", "-b", help=_budget_help()),
    shipped: bool = typer.Option(False, "--shipped", help="List the trained models flm ships instead (their "
                                 "names work as FaceLandmarker.create(NAME) and flm detect --model NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout instead of a table."),
):
    """List the model presets with their size as float32 (MB = 10^6 bytes) and whether each fits;
    with --shipped, the trained models flm ships."""
    if shipped:  # the runtime lists them: no torch needed
        from flm.runtime.commands import show_shipped_models

        return show_shipped_models(as_json)
    from flm.budgets.commands import show_presets

    show_presets(budget, as_json)


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


def _show_values_taken(cmd) -> None:
    """Help's type column says what an option takes on the command line: nothing after a flag (typer
    writes `<bool>`), and one value, given once per use, after a repeatable option (not `<list[str]>`)."""
    for p in [*cmd.params, cmd.get_help_option(typer.Context(cmd))]:
        if p is None:
            continue
        if p.metavar is None and getattr(p, "is_flag", False):
            p.metavar = ""
        elif p.metavar is None and getattr(p, "multiple", False):
            p.metavar = "<" + " ".join(t.__name__ for t in get_args(p.type_descriptor.annotation)) + ">"
    for sub in getattr(cmd, "commands", {}).values():
        _show_values_taken(sub)


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        command = typer.main.get_command(app)
        _show_values_taken(command)
        # in standalone_mode=False, `raise typer.Exit(130)` (and Ctrl-C) come back as the return value
        code = command(args=argv, standalone_mode=False, prog_name="flm")
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
