"""`flm data check / info / synth / formats` through the real command line entry point."""

import pytest

import flm.ui
from flm.cli import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # tables fold long cells at the terminal width; tmp paths are long
    monkeypatch.setattr(flm.ui.out, "width", 400)
    monkeypatch.setattr(flm.ui.console, "width", 400)


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_formats_lists_every_reader(capsys):
    code, out, _ = run(capsys, "data", "formats")
    assert code == 0
    for name in ("udacity", "ibug-xml", "ibug-pts", "wflw", "aflw2000", "facesynthetics", "synthetic"):
        assert f"│ {name} " in out


def test_synth_then_info_then_check(tmp_path, capsys):
    d = tmp_path / "synth set"  # a space in the path
    code, out, err = run(capsys, "data", "synth", "--out", str(d), "-n", "8", "--seed", "2")
    assert code == 0, err
    assert (d / "landmarks.csv").is_file() and len(list((d / "images").glob("*.jpg"))) == 8
    code, out, err = run(capsys, "data", "info", f"udacity:{d}")
    assert code == 0, err
    assert "│ samples      │ 8 " in out and "│ identities   │ 2 " in out and "ibug68 (68 points)" in out
    code, out, err = run(capsys, "data", "check", f"udacity:{d}")
    assert code == 0, err
    assert "│ good            │ 8 " in out and "│ bad             │ 0 " in out


def test_synth_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = run(capsys, "data", "synth", "--out", str(tmp_path), "-n", "2")
    assert code != 0 and "refusing to replace" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").exists()


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
    assert f"{csv}:3 " in out and "not finite" in out
    assert f"{csv}:4 " in out and f"image not found: {tmp_path / 'images' / names[2]}" in out
    assert f"{csv}:5 " in out and "cannot decode" in out and names[3] in out
    assert f"{csv}:8 " in out and "duplicate row" in out
    assert "│ good            │ 3 " in out and "│ bad             │ 4 " in out
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
    assert "ibug68 (68 points)" in out and "│ good            │ 0 " in out
    code, out, err = run(capsys, "data", "check", "nosuch:dir")
    assert code == 2 and "unknown dataset format 'nosuch'" in err and "example:" in err and "Traceback" not in err
    code, out, err = run(capsys, "data", "info", f"udacity:{tmp_path / 'missing'}")
    assert code == 2 and "not found" in err


def test_info_on_the_builtin_set(capsys):
    code, out, err = run(capsys, "data", "info", "synthetic:12:4")
    assert code == 0, err
    assert "│ samples      │ 12 " in out and "│ identities   │ 3 " in out and "yaw" in out
    sizes = [int(v) for v in out.split("image width")[1].split("px")[0].replace("..", " ").split() if v.isdigit()]
    assert len(sizes) >= 2 and 192 <= min(sizes) and max(sizes) <= 256


@pytest.mark.parametrize("flag,value", [("--aug-strength", "-1"), ("--aug-crop", "4"), ("--aug-flip", "1.5")])
def test_train_refuses_augmentation_out_of_range(capsys, flag, value):
    code, out, err = run(capsys, "train", flag, value, "--epochs", "1")
    assert code == 2 and flag in err and value in err and "Traceback" not in err
