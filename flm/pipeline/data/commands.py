"""`flm data ...`: check, describe and generate landmark datasets."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flm.errors import DatasetError, FlmError, UsageError, check_at_least
from flm.ui import console, out


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    data_app.command("check")(check)
    data_app.command("info")(info)
    data_app.command("synth")(synth)
    data_app.command("formats")(formats)
    from flm.pipeline.data import download  # flm data download (owned by download.py)
    download.register(data_app)


# --------------------------------------------------------------------------- check


def check(spec: str = typer.Argument(..., help="FORMAT:PATH, e.g. udacity:../shared/data/youtube-faces-68"),
          skip_bad: bool = typer.Option(False, "--skip-bad", help="Bad samples are expected: exit 0 if "
                                        "usable samples remain (they are still listed)."),
          workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Threads decoding images."),
          limit: int = typer.Option(50, help="Show at most this many problems (all are counted).")):
    """Read every annotation and decode every image; list every bad row or file.

    Exits non-zero if anything is bad (with --skip-bad: only if nothing usable is left).
    """
    fmt, ds, problems = _read_listing_problems(spec, limit)
    sizes = _decode_all(spec, ds, workers, problems)
    _list_problems(problems, limit)
    summary = Table(title=f"data check {escape(spec)}", show_header=False)
    summary.add_row("format / scheme", f"{fmt} / {_scheme(ds)}")
    summary.add_row("samples read", str(len(ds) + len(ds.skipped)))
    summary.add_row("good", f"[green]{len(sizes)}")
    summary.add_row("bad", f"[red]{len(problems)}" if problems else "0")
    if sizes:
        a = np.array(sizes)
        summary.add_row("image sizes", f"{a[:, 0].min()}..{a[:, 0].max()} x {a[:, 1].min()}..{a[:, 1].max()} px")
    out.print(summary)
    _fail_if_bad(spec, len(problems), len(sizes), skip_bad)


def _decode_all(spec: str, ds, workers: int, problems: list) -> list[tuple[int, int]]:
    """Decode and check every sample of `ds` on `workers` threads, with a progress bar.

    Returns the (width, height) of each good image; appends (where, problem) of each bad one
    to `problems`, in sample order."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    sizes = []
    with Progress(TextColumn("decoding"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("decode", total=len(ds))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for w, h, problem in pool.map(lambda item: _decode_one(spec, ds, *item), enumerate(ds.samples)):
                if problem:
                    problems.append(problem)
                else:
                    sizes.append((w, h))
                bar.advance(task)
    return sizes


def _decode_one(spec: str, ds, i: int, s):
    """(width, height, None) of sample `i` when it decodes and its points fit, else (None, None, problem)."""
    from flm.pipeline.data import check_points

    source = s.meta.get("source") or f"{spec} sample {i}"
    try:
        img = s.load()
        check_points(s.points, ds.num_points, source, s.line, image_size=(img.shape[1], img.shape[0]))
        return img.shape[1], img.shape[0], None
    except DatasetError as e:
        return None, None, _sample_problem(e, s, source)


def _list_problems(problems: list, limit: int) -> None:
    """The problems table, sorted by file and line, when there are any."""
    if problems:
        _problem_table(sorted(problems, key=_order), len(problems), limit)


def _fail_if_bad(spec: str, bad: int, good: int, skip_bad: bool) -> None:
    """Raise if any sample is bad (with `skip_bad`: only if none is good)."""
    if bad and (not skip_bad or good == 0):
        hint = " (use --skip-bad to train on the good ones)" if good else ""
        raise FlmError(f"{spec}: {bad} bad sample(s) of {good + bad}{hint}")


def _read_listing_problems(spec: str, limit: int):
    """(format, dataset of the good samples, [(where, problem)] of the bad ones) for `spec`.

    The reader itself, not open_dataset: a set where every sample is bad still lists why. A
    whole-file problem (not UTF-8, malformed XML) is shown as one row, then stops."""
    from flm.pipeline.data import READERS, open_dataset

    fmt, _, path = spec.partition(":")
    if fmt not in READERS or (fmt != "synthetic" and (not path or not Path(path).exists())):
        open_dataset(spec)  # raises the usual error, with an example
    try:
        ds = READERS[fmt][0](path, skip_bad=True)
    except DatasetError as e:
        _problem_table([(_where(e), e.problem)], 1, limit)
        raise FlmError(f"{spec}: unusable ({e})") from None
    ds.name = spec
    return fmt, ds, [_split(reason) for reason in ds.skipped]


def _sample_problem(e: DatasetError, s, source: str) -> tuple[str, str]:
    """(where, problem) of an error found in a sample after reading: its annotation file:line,
    and the problem, prefixed with the file it is about when that is another (the image)."""
    where = f"{source}:{s.line}" if s.line is not None else source
    return where, e.problem if e.path == source else f"{e.path}: {e.problem}"


def _problem_table(rows, total: int, limit: int) -> None:
    t = Table(title=f"{total} problem(s)" + (f", first {limit} shown" if total > limit else ""))
    t.add_column("#", justify="right")
    t.add_column("where (file:line)", overflow="fold")
    t.add_column("problem", overflow="fold")
    for k, (where, what) in enumerate(rows[:limit], start=1):
        t.add_row(str(k), Text(where), Text(what))  # Text: never read as rich markup
    out.print(t)


def _order(problem):
    """Sort key: file, then line number as a number."""
    file, _, line = problem[0].rpartition(":")
    return (file, int(line), problem[1]) if line.isdigit() else (problem[0], -1, problem[1])


def _scheme(ds) -> str:
    from flm.spec import SCHEMES

    return f"{ds.scheme} ({SCHEMES[ds.scheme]['points'] if ds.scheme in SCHEMES else ds.num_points} points)"


def _where(e: DatasetError) -> str:
    return f"{e.path}:{e.line}" if e.line is not None else e.path


def _split(reason: str) -> tuple[str, str]:
    """A skipped reason 'FILE:LINE: problem' or 'FILE: problem' -> (where, problem)."""
    m = re.match(r"^(.*?:\d+): (.*)$", reason, re.S) or re.match(r"^(.*?): (.*)$", reason, re.S)
    return (m.group(1), m.group(2)) if m else ("", reason)


# --------------------------------------------------------------------------- info


def info(spec: str = typer.Argument(..., help="FORMAT:PATH"),
         skip_bad: bool = typer.Option(False, "--skip-bad", help="Bad samples are expected: exit 0 if usable "
                                       "samples remain (they are still counted)."),
         limit: int = typer.Option(5, help="Show at most this many problems (all are counted).")):
    """Count, identities, scheme, points and image sizes (from headers; nothing decoded where a
    header tells the size).

    Bad samples are counted and the first few listed (`flm data check` decodes every image and
    lists them all); exits non-zero if any is bad (with --skip-bad: only if nothing usable is left).
    """
    _, ds, problems = _read_listing_problems(spec, limit)
    good, sizes = _header_sizes(spec, ds, problems)
    _list_problems(problems, limit)
    out.print(_info_table(spec, ds, good, sizes, len(problems)))
    _fail_if_bad(spec, len(problems), len(good), skip_bad)


def _header_sizes(spec: str, ds, problems: list) -> tuple[list, list]:
    """(good samples, their (width, height)): from the image header where it tells the size, else
    by decoding. Appends (where, problem) of each sample that does neither to `problems`."""
    from flm.images import image_size

    good, sizes = [], []
    for i, s in enumerate(ds.samples):
        try:
            if callable(s.image):
                size = getattr(s.image, "size", None) or s.load().shape[1::-1]
            else:
                size = image_size(s.image) or s.load().shape[1::-1]
        except DatasetError as e:  # an image whose header does not tell its size, and does not decode
            problems.append(_sample_problem(e, s, s.meta.get("source") or f"{spec} sample {i}"))
            continue
        good.append(s)
        sizes.append(size)
    return good, sizes


def _info_table(spec: str, ds, good: list, sizes: list, bad: int) -> Table:
    t = Table(title=f"data info {escape(spec)}", show_header=False)
    t.add_row("samples", str(len(good)))
    if bad:
        t.add_row("bad", f"[red]{bad}[/] (list them all: flm data check {escape(spec)})")
    ids = {s.identity for s in good if s.identity}
    t.add_row("identities", f"{len(ids)}" + ("" if good and all(s.identity for s in good) else
                                             " (not all samples have one: no identity split; pass --val)"))
    t.add_row("scheme", _scheme(ds))
    if sizes:
        a = np.array(sizes)
        t.add_row("image width", f"{a[:, 0].min()}..{a[:, 0].max()} px (median {int(np.median(a[:, 0]))})")
        t.add_row("image height", f"{a[:, 1].min()}..{a[:, 1].max()} px (median {int(np.median(a[:, 1]))})")
        t.add_row("face boxes", "given" if all(s.box is not None for s in good) else "from the landmarks")
    yaws = [s.meta["yaw"] for s in good if "yaw" in s.meta]
    if yaws:
        t.add_row("yaw", f"{min(yaws):.1f}..{max(yaws):.1f} deg")
    return t


# --------------------------------------------------------------------------- synth


def synth(out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write (images/ + landmarks.csv)."),
          n: int = typer.Option(1200, "--faces", "-n", help="Number of faces (4 per identity)."),
          seed: int = typer.Option(0, "--seed")):
    """Write the built-in synthetic faces in the Udacity CSV layout (read back with udacity:DIR)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from flm.pipeline.data.synthetic import synthetic_dataset, write_udacity

    for flag, value, least in (("--faces", n, 1), ("--seed", seed, 0)):
        check_at_least(flag, value, least, example="flm data synth --out data/synth --faces 1200 --seed 0")
    ds = synthetic_dataset(n, seed)
    with Progress(TextColumn("writing faces"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("synth", total=n)
        write_udacity(ds, out_dir, progress=lambda done, total: bar.update(task, completed=done))
    out.print(f"wrote {n} faces ({(n + 3) // 4} identities) to {out_dir}; use it as udacity:{out_dir}",
              markup=False, highlight=False)


# --------------------------------------------------------------------------- formats


def formats():
    """The dataset formats flm reads, with an example FORMAT:PATH for each."""
    from flm.pipeline.data import READERS

    t = Table(title="dataset formats (name a dataset as FORMAT:PATH)")
    t.add_column("format")
    t.add_column("example", overflow="fold")
    t.add_column("what it reads", overflow="fold")
    for name, (_, example, description) in sorted(READERS.items()):
        t.add_row(name, example, description)
    out.print(t)
