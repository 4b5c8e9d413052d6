"""`flm export` and `flm verify`.

`flm export` validates every argument against the table of targets before any work, then for
each target: exports to a temporary path beside the final one, re-opens that file from disk and
verifies its parity with the checkpoint, and only then moves it into place. A file that fails
the check never reaches the final path: it is kept as `model.failed.onnx` /
`model.failed.mlpackage` for inspection (removed again by the next successful export) and the
command exits non-zero. A file already at the final path from an earlier export is untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import typer

from flm.errors import ParityError, UsageError
from flm.exporters import (DEFAULT_OPSET, DEFAULT_SAMPLES, Target, check_needs, check_options, failed_path,
                           resolve_targets, target_for_path)
from flm.fileio import atomic_path, log_written, remove
from flm.ui import console, out

log = logging.getLogger("flm")


def export_target(model, target: Target, final: Path, inputs, options: dict, against: str = "model"):
    """Export `model` for `target` to `final`, verified: returns the passing ParityReport.

    Raises ParityError (with the report) if the re-opened file does not match; `final` is then
    not written and the file is kept at `failed_path(final)`.
    """
    from flm.exporters.parity import check

    final = Path(final)
    failed = failed_path(final, target)
    with atomic_path(final, suffix=target.suffix) as tmp:
        with console.status(f"exporting {target.name} ..."):
            target.export_fn()(model, tmp, **options)
        with console.status(f"verifying {target.name} parity on {len(inputs)} inputs ..."):
            report = check(target.open_fn()(tmp), model, inputs, against)
        report.path = str(final)
        if not report.passed:
            report.path = str(failed)
            remove(failed)
            os.replace(tmp, failed)
            raise ParityError(report.summary(), report)
    remove(failed)  # a failed file from an earlier run must not sit beside a good one
    return report


def _write_json(path: Path, reports: list) -> None:
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    log_written(path, started)


def export(
    checkpoint: Path = typer.Argument(..., help="A best.pt / last.pt written by `flm train`."),
    target: str = typer.Option("all", "--target", "-t", help="onnx | coreml | all"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default: <checkpoint folder>/export."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (18 or later)."),
    decode: bool = typer.Option(True, "--decode/--no-decode",
                                help="Put heatmap -> landmark decoding in the graph (heatmaps stay available)."),
    lean: bool = typer.Option(True, "--lean/--plain", help="ONNX: a ShuffleNetV2 trunk laid out for onnxruntime's CPU "
                              "convolutions (padded channels, gathers: same outputs, ~0.8x the time) or as PyTorch has it."),
    coreml_input: str = typer.Option("image", "--coreml-input",
                                     help="Core ML input: image (pixel buffer, normalised in-graph) | tensor."),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", help="Inputs for the parity check."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="FORMAT:PATH for parity crops; default: generated faces."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the parity reports as JSON."),
    convention: Optional[str] = typer.Option(None, "--convention", help="For a model trained on several "
                                             "annotation conventions: the one the file outputs (default: "
                                             "the first --data source's)."),
):
    """Export a checkpoint to ONNX and/or Core ML; every file is parity-checked before it is published."""
    targets = resolve_targets(target)
    options = {"onnx": {"decode": decode, "opset": opset, "lean": lean}, "coreml": {"decode": decode, "coreml_input": coreml_input}}
    _check_export_options(checkpoint, targets, options, opset, coreml_input, samples)

    from flm.exporters.parity import make_inputs
    from flm.pipeline.checkpoint import load_model
    from flm.pipeline.models import single_convention

    model = single_convention(load_model(checkpoint), convention)
    inputs = make_inputs(model.spec, samples, data)
    reports, failures = _export_targets(model, targets, out_dir or Path(checkpoint).parent / "export", inputs,
                                        options, str(checkpoint))
    if json_out:
        _write_json(json_out, reports)
    if failures:
        raise ParityError("; ".join(str(e) for e in failures), failures[0].report)


def _check_export_options(checkpoint, targets, options: dict, opset: int, coreml_input: str, samples: int) -> None:
    from flm.exporters.coreml import INPUT_KINDS
    from flm.exporters.onnx import MIN_OPSET

    for t in targets:
        check_options(t, options[t.name])
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is not supported (torch's exporter writes an invalid Split below "
                         f"{MIN_OPSET})", example=f"flm export {checkpoint} --target onnx --opset 18")
    if coreml_input not in INPUT_KINDS:
        raise UsageError(f"unknown --coreml-input {coreml_input!r}; known: {', '.join(INPUT_KINDS)}",
                         example=f"flm export {checkpoint} --target coreml --coreml-input image")
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}", example=f"flm export {checkpoint} --samples 8")
    check_needs(targets)


def _export_targets(model, targets, out_dir: Path, inputs, options: dict, against: str):
    """Export `model` to every target, each parity-checked; (reports, the ParityErrors of files that failed)."""
    from flm.exporters.parity import report_table

    reports, failures = [], []
    for t in targets:
        final = out_dir / t.filename
        started = time.perf_counter()
        try:
            report = export_target(model, t, final, inputs, options[t.name], against=against)
        except ParityError as e:
            if e.report is None:
                raise
            report = e.report
            failures.append(e)
            log.error("%s failed its parity check; kept for inspection at %s", t.name, report.path)
        else:
            log_written(final, started)
        reports.append(report)
        out.print(report_table(report))
    return reports, failures


def verify(
    exported: Path = typer.Argument(..., help="model.onnx or model.mlpackage written by `flm export`."),
    against: Path = typer.Option(..., "--against", help="The checkpoint it was exported from."),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", help="Inputs to compare on."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="FORMAT:PATH for the crops; default: generated faces."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the parity report as JSON."),
):
    """Check that an exported file reproduces its checkpoint (max |diff| per output, landmark error in px)."""
    target = target_for_path(exported)
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}",
                         example=f"flm verify {exported} --against {against} --samples 8")
    check_needs([target])

    from flm.exporters.parity import check, make_inputs, report_table
    from flm.pipeline.checkpoint import load_model
    from flm.pipeline.models import single_convention

    opened = target.open_fn()(exported)  # a foreign or truncated file fails here, before any torch work
    # the file holds one of the checkpoint's convention heads (compare with that one) or, exported
    # from a gated model, all of them and the gate (compare with the model as it is)
    names = opened.spec.conventions
    model = single_convention(load_model(against), names[0] if len(names) == 1 else None)
    inputs = make_inputs(model.spec, samples, data)
    with console.status(f"running {exported} on {len(inputs)} inputs ..."):
        report = check(opened, model, inputs, str(against))
    out.print(report_table(report))
    if json_out:
        _write_json(json_out, [report])
    if not report.passed:
        raise ParityError(report.summary(), report)


def register(app, data_app) -> None:
    app.command("export")(export)
    app.command("verify")(verify)
