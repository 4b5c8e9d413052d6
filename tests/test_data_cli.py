"""`flm data check / info / synth / formats` through the real command line entry point.

Under pytest stdout and stderr are not terminals, so the commands print plain lines (see
flm/ui.py): a table is its title, then one line per row, cells two spaces apart.
"""

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.table import Table

from flm.cli import main
from flm.ui import FlmConsole

from tests.helpers.data import face_points, write_aflw

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def row(out: str, key: str) -> str:
    """The value cell of the plain line `KEY  VALUE` of a two-column table."""
    found = [line for line in out.splitlines() if re.match(rf"{re.escape(key)}  +\S", line)]
    assert len(found) == 1, (key, out)
    return found[0][len(key):].strip()


def line_with(out: str, text: str) -> str:
    """The one line of `out` that holds `text` whole."""
    found = [line for line in out.splitlines() if text in line]
    assert len(found) == 1, (text, out)
    return found[0]


def test_formats_lists_every_reader(capsys):
    code, out, _ = run(capsys, "data", "formats")
    assert code == 0
    for name in ("udacity", "ibug-xml", "ibug-pts", "wflw", "aflw2000", "facesynthetics", "synthetic"):
        assert re.search(rf"^{name} +{name}", out, re.M), out  # name, then its example, on one line


def test_synth_then_info_then_check(tmp_path, capsys):
    d = tmp_path / "synth set"  # a space in the path
    code, out, err = run(capsys, "data", "synth", "--out", str(d), "-n", "8", "--seed", "2")
    assert code == 0, err
    assert (d / "landmarks.csv").is_file() and len(list((d / "images").glob("*.jpg"))) == 8
    code, out, err = run(capsys, "data", "info", f"udacity:{d}")
    assert code == 0, err
    assert row(out, "samples") == "8" and row(out, "identities") == "2" and row(out, "scheme") == "ibug68 (68 points)"
    assert "bad" not in out
    code, out, err = run(capsys, "data", "check", f"udacity:{d}")
    assert code == 0, err
    assert row(out, "good") == "8" and row(out, "bad") == "0"


def test_synth_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = run(capsys, "data", "synth", "--out", str(tmp_path), "-n", "2")
    assert code != 0 and "refusing to replace" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").exists()


def test_synth_counts_are_checked_and_faces_has_a_long_form(tmp_path, capsys):
    code, _, err = run(capsys, "data", "synth", "--out", str(tmp_path / "a"), "--faces", "0")
    assert code == 2 and "--faces must be a whole number of at least 1, got 0" in " ".join(err.split())
    assert not (tmp_path / "a").exists()
    code, _, err = run(capsys, "data", "synth", "--out", str(tmp_path / "b"), "--faces", "4")
    assert code == 0 and len((tmp_path / "b" / "landmarks.csv").read_text().splitlines()) == 5, err


def _bad_set(root):
    from flm.pipeline.data.synthetic import synthetic_dataset, write_udacity

    write_udacity(synthetic_dataset(6, seed=1), root)
    lines = (root / "landmarks.csv").read_text().splitlines()
    names = [line.split(",")[0] for line in lines[1:]]
    cells = lines[2].split(",")
    cells[5] = "nan"
    lines[2] = ",".join(cells)  # line 3: NaN point
    (root / "images" / names[2]).unlink()  # line 4: missing image
    jpg = root / "images" / names[3]
    jpg.write_bytes(jpg.read_bytes()[:2000])  # line 5: truncated JPEG (only found by decoding)
    lines.append(lines[1])  # line 8: duplicate of line 2
    (root / "landmarks.csv").write_text("\n".join(lines) + "\n")
    return names


def test_check_reports_every_bad_row_and_fails(tmp_path, capsys):
    names = _bad_set(tmp_path)
    code, out, err = run(capsys, "data", "check", f"udacity:{tmp_path}")
    assert code == 1
    csv = tmp_path / "landmarks.csv"
    assert "4 problem(s)" in out
    assert "not finite" in line_with(out, f"{csv}:3 ")
    assert f"image not found: {tmp_path / 'images' / names[2]}" in line_with(out, f"{csv}:4 ")
    assert "cannot decode" in line_with(out, f"{csv}:5 ") and names[3] in line_with(out, f"{csv}:5 ")
    assert "duplicate row" in line_with(out, f"{csv}:8 ")
    assert row(out, "good") == "3" and row(out, "bad") == "4"
    assert "4 bad sample(s) of 7" in err and "--skip-bad" in err
    # with --skip-bad the same problems are listed, and the set is usable
    code, out, err = run(capsys, "data", "check", f"udacity:{tmp_path}", "--skip-bad")
    assert code == 0 and "4 problem(s)" in out


def test_check_whole_file_problem_and_bad_spec(tmp_path, capsys):
    (tmp_path / "landmarks.csv").write_bytes(b",0\nJos\xe9_1.jpg,1\n")
    code, out, err = run(capsys, "data", "check", f"udacity:{tmp_path}")
    assert code == 1 and f"{tmp_path / 'landmarks.csv'}:2" in out and "not UTF-8" in out
    # every row bad: each one is still listed, not just "no usable samples"
    (tmp_path / "landmarks.csv").write_text(",0\n" + "".join(f"gone_{k}.jpg," + ",".join(["1", "2"] * 68) + "\n"
                                                           for k in range(3)))
    code, out, err = run(capsys, "data", "check", f"udacity:{tmp_path}", "--skip-bad")
    assert code == 1 and "3 problem(s)" in out and all(f"gone_{k}.jpg" in out for k in range(3))
    assert "ibug68 (68 points)" in out and row(out, "good") == "0"
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path}")  # info: the same, all counted
    assert code == 1 and "3 problem(s)" in out
    assert row(out, "samples") == "0" and row(out, "bad").startswith("3 ") and "3 bad sample(s) of 3" in err
    (tmp_path / "landmarks.csv").write_bytes(b",0\nJos\xe9_1.jpg,1\n")
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path}")
    assert code == 1 and "not UTF-8" in line_with(out, f"{tmp_path / 'landmarks.csv'}:2 ") and "unusable" in err
    code, out, err = run(capsys, "data", "check", "nosuch:dir")
    assert code == 2 and "unknown dataset format 'nosuch'" in err and "example:" in err and "Traceback" not in err
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path / 'missing'}")
    assert code == 2 and "not found" in err


def test_info_counts_every_bad_file_instead_of_stopping_at_the_first(tmp_path, capsys):
    names = _bad_set(tmp_path)
    (tmp_path / "images" / names[4]).write_bytes(b"not an image at all " * 20)  # line 6: no header to read
    csv = tmp_path / "landmarks.csv"
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path}")
    assert code == 1
    assert "4 problem(s)" in out
    assert "not finite" in line_with(out, f"{csv}:3 ")
    assert "image not found" in line_with(out, f"{csv}:4 ")
    assert "cannot decode" in line_with(out, f"{csv}:6 ")  # info decodes only what a header does not size
    assert "duplicate row" in line_with(out, f"{csv}:8 ")
    assert row(out, "samples") == "3" and row(out, "bad").startswith("4 ") and "flm data check" in row(out, "bad")
    assert row(out, "identities") == "2" and "px" in row(out, "image width")  # faces 1, 4, 6: 4 a person
    assert "4 bad sample(s) of 7" in err and "--skip-bad" in err and "Traceback" not in err
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path}", "--skip-bad", "--limit", "2")
    assert code == 0, err
    assert "4 problem(s), first 2 shown" in out and f"{csv}:3 " in out and f"{csv}:8 " not in out
    assert row(out, "samples") == "3"


def test_info_prints_aflw2000_yaw_wrapped_to_plus_minus_180(tmp_path, capsys):
    pytest.importorskip("scipy", reason="AFLW2000-3D .mat files need scipy (flm[train])")
    write_aflw(tmp_path, "image00002", face_points(0), [0, -351.2, 0])  # as stored in some real files
    write_aflw(tmp_path, "image00004", face_points(1), [0, 187.8, 0])
    code, out, err = run(capsys, "data", "info", f"aflw2000:{tmp_path}")
    assert code == 0, err
    assert row(out, "yaw") == "-172.2..8.8 deg"


def test_info_on_the_builtin_set(capsys):
    code, out, err = run(capsys, "data", "info", "synthetic:12:4")
    assert code == 0, err
    assert row(out, "samples") == "12" and row(out, "identities") == "3" and "yaw" in out
    sizes = [int(v) for v in out.split("image width")[1].split("px")[0].replace("..", " ").split() if v.isdigit()]
    assert len(sizes) >= 2 and 192 <= min(sizes) and max(sizes) <= 256


@pytest.mark.parametrize("flag,value", [("--aug-strength", "-1"), ("--aug-crop", "4"), ("--aug-flip", "1.5")])
def test_train_refuses_augmentation_out_of_range(capsys, flag, value):
    code, out, err = run(capsys, "train", flag, value, "--epochs", "1")
    assert code == 2 and flag in err and value in err and "Traceback" not in err


# --------------------------------------------------------------------------- output that survives a pipe


def test_check_piped_prints_each_problem_on_one_grepable_line(tmp_path):
    """`flm data check ... | grep landmarks.csv:5` must find the row, at any terminal width."""
    root = tmp_path / "a folder whose name is long enough to wrap an eighty column table" / "set"
    root.mkdir(parents=True)
    names = _bad_set(root)
    csv = root / "landmarks.csv"
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    env.pop("FORCE_COLOR", None)
    r = subprocess.run([sys.executable, "-m", "flm.cli", "data", "check", f"udacity:{root}"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    hits = [line for line in r.stdout.splitlines() if f"{csv}:5" in line]  # what grep would print
    assert len(hits) == 1 and "cannot decode" in hits[0] and names[3] in hits[0], r.stdout
    assert f"image not found: {root / 'images' / names[2]}" in line_with(r.stdout, f"{csv}:4 ")
    assert not any(ch in r.stdout for ch in "│┃━─"), r.stdout  # no box drawing around the rows
    assert f"udacity:{root}: 4 bad sample(s) of 7" in line_with(r.stderr, "error: ")


def test_log_lines_do_not_wrap_when_stderr_is_not_a_terminal(capsys):
    assert main(["data", "formats"]) == 0  # sets up logging as every command does
    capsys.readouterr()
    long = "/data/" + "a-long-folder-name/" * 30 + "landmarks.csv:5"
    logging.getLogger("flm").warning("skipped %s", long)
    logging.getLogger("flm").info("read %s", long)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: skipped {long}", f"read {long}"]


def _table():
    t = Table(title="2 problem(s)")
    t.add_column("#", justify="right")
    t.add_column("where (file:line)", overflow="fold")
    t.add_column("problem", overflow="fold")
    t.add_row("9", "/a/very/long/path/to/some/dataset/landmarks.csv:5", "[red]cannot decode[/] (truncated)")
    t.add_row("10", "b.csv:12", "multi\nline")
    return t


def test_plain_table_when_not_a_terminal():
    f = io.StringIO()
    FlmConsole(file=f, width=30).print(_table())  # narrower than any row
    assert f.getvalue().splitlines() == [
        "2 problem(s)",
        " #  where (file:line)                                  problem",
        " 9  /a/very/long/path/to/some/dataset/landmarks.csv:5  cannot decode (truncated)",
        "10  b.csv:12                                           multi line",
    ]
    f = io.StringIO()
    FlmConsole(file=f, width=30).print("x" * 100, "and more")  # text is not wrapped either
    assert f.getvalue() == "x" * 100 + " and more\n"


def test_rich_table_on_a_terminal():
    f = io.StringIO()
    FlmConsole(file=f, width=60, force_terminal=True, color_system=None).print(_table())
    assert "│" in f.getvalue() and "landmarks.csv:5" not in f.getvalue()  # boxed, and folded to the width
