"""`flm check-budget` and `flm models`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from flm.budgets import DEFAULT_BUDGET, MB, budget_names, enforce, evaluate, format_bytes, get_budget
from flm.ui import out

# One line per paragraph: typer keeps a docstring's line breaks, which reads badly when wrapped.
CHECK_BUDGET_HELP = "\n\n".join([
    "Check a model against a budget; exit 0 only if every rule passes, else exit 1 naming the failing rules.",
    "challenge-15mb: at most 15 MB, float32 weights only (no float16, bfloat16, int8 or other quantization; "
    "an integer tensor is a weight unless it is only read as a shape, axes or indices), "
    "a single model (no ensemble at any depth of a checkpoint, and no weights beside the one its spec builds), "
    "and real weights (not none, not all zero).",
    "MB means 10^6 bytes: 15 MB = 15,000,000 bytes (the stricter reading).",
    "Size is the float32 bytes of parameters + buffers for a checkpoint or preset, and the size on disk for "
    "ONNX (with its external data files) and Core ML (the whole package, weight blobs included).",
])


def check_budget(
    target: str = typer.Argument(..., help="A checkpoint (.pt), a model preset name, an .onnx file, "
                                           "or a Core ML .mlpackage / .mlmodel."),
    budget: str = typer.Option(DEFAULT_BUDGET, "--budget", "-b",
                               help=f"Budget to check against: {', '.join(budget_names())}."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full measurement and verdict as JSON."),
):
    """Check a model against a budget (help text: CHECK_BUDGET_HELP)."""
    from flm.budgets.measure import measure

    b = get_budget(budget)
    started = time.perf_counter()
    m = measure(target)
    results = evaluate(m, b)
    out.print(_verdict_table(target, b, results))
    out.print(_measurement_table(m))
    if json_out is not None:
        _write_verdict(json_out, b, results, m, started)
    enforce(results, b)
    out.print(f"[green]{target} fits budget {b.name}")


def _verdict_table(target: str, b, results) -> Table:
    """One row per rule: measured, limit, pass or FAIL."""
    t = Table(title=f"{target}: budget {b.name} (MB = 10^6 bytes)")
    for col in ("rule", "measured", "limit", "result"):
        t.add_column(col, overflow="fold")
    for r in results:
        t.add_row(r.rule, r.measured, r.limit, "[green]pass" if r.passed else "[red]FAIL")
    return t


def _measurement_table(m) -> Table:
    """What was measured: kind, parameters, weights by dtype, bookkeeping tensors, notes."""
    d = Table(title="measurement", show_header=False)
    d.add_column("what")
    d.add_column("value", overflow="fold")
    d.add_row("kind", m.kind)
    d.add_row("parameters", f"{m.parameters:,}")
    d.add_row("weights", f"{m.weight_elements:,} values in {m.weight_tensors} tensors; "
                         f"as float32 {format_bytes(m.float32_bytes)}")
    if m.disk_bytes is not None:
        d.add_row("on disk", format_bytes(m.disk_bytes))
    for dtype, c in sorted(m.weight_dtypes.items()):
        d.add_row(f"weights {dtype}", f"{c.tensors} tensors, {c.elements:,} values, {c.bytes:,} bytes stored")
    for dtype, c in sorted(m.bookkeeping_dtypes.items()):
        d.add_row(f"bookkeeping {dtype}", f"{c.tensors} tensors, {c.elements:,} values (shapes, counters: not weights)")
    for note in m.notes:
        d.add_row("note", note)
    return d


def _write_verdict(path: Path, b, results, m, started: float) -> None:
    """`flm check-budget --json`: the budget, the verdict per rule and the full measurement."""
    from flm.fileio import atomic_path, log_written

    payload = {"budget": vars(b) | {"allowed_dtypes": list(b.allowed_dtypes)},
               "passed": all(r.passed for r in results), "rules": [vars(r) for r in results],
               "measurement": m.to_json(), "seconds": round(time.perf_counter() - started, 3)}
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    log_written(path, t0)


def show_presets(budget: str, as_json: bool) -> None:
    """`flm models`: the presets with their float32 size and whether each fits `budget`."""
    from flm.budgets import preset_footprint
    from flm.pipeline.models import PRESETS

    b = get_budget(budget)
    if as_json:
        rows = []
        for name, p in PRESETS.items():
            params, size = preset_footprint(name)
            s = p.spec
            rows.append({"name": name, "points": s.num_points, "input_size": s.input_size,
                         "color_order": s.color_order, "output": s.output, "params": params,
                         "mb": round(size / MB, 2), "fits": size <= b.max_bytes, "budget": b.name,
                         "description": p.description})
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    wide = out.width >= 130  # else descriptions go in a second table, so 80 columns stay readable
    t = Table(title=f"model presets (MB: float32 size, 10^6 bytes; fits: within {b.name})",
              box=box.SIMPLE, pad_edge=False)
    for col, justify in (("name", "left"), ("points", "right"), ("input", "left"), ("output", "left"),
                         ("params", "right"), ("MB", "right"), ("fits", "left")):
        t.add_column(col, justify=justify, no_wrap=True)
    if wide:
        t.add_column("description", ratio=1)
    descriptions = Table("name", "description", box=box.SIMPLE)
    for name, p in PRESETS.items():
        params, size = preset_footprint(name)
        s = p.spec
        description = p.description
        t.add_row(name, str(s.num_points), f"{s.input_size} {s.color_order}", s.output, f"{params:,}",
                  f"{size / MB:.2f}", "[green]yes" if size <= b.max_bytes else "[red]no",
                  *([description] if wide else []))
        descriptions.add_row(name, description)
    out.print(t)
    if not wide:
        out.print(descriptions)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command("check-budget", help=CHECK_BUDGET_HELP)(check_budget)
