"""Every user error on the command line: a non-zero exit, one line saying what is wrong and a
correct example, no traceback; `--debug` shows the traceback. `flm` runs as a real subprocess."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from flm.cli import main

from tests.helpers.cli import REPO, flm

AFLW = REPO.parent / "shared" / "data" / "aflw2000-3d-val"  # a real set with no people / photo names

# name -> (arguments ({tmp} is a fresh folder), exit code, words of the message, words of the example)
CASES = {
    "FORMAT:PATH without a path": (["data", "check", "udacity"], 2, "needs a path after the colon", "udacity:"),
    "unknown dataset format": (["data", "info", "nosuch:dir"], 2, "unknown dataset format 'nosuch'", "udacity:"),
    "dataset folder missing": (["data", "check", "udacity:{tmp}/missing"], 2, "dataset path not found", "udacity:"),
    "unknown preset": (["train", "--model", "nope"], 2, "unknown model preset 'nope'",
                       "flm train --model shufflenet-heatmap"),
    "unknown export target": (["export", "{tmp}/best.pt", "--target", "tflite"], 2, "unknown export target 'tflite'",
                              "--target onnx"),
    "checkpoint missing": (["evaluate", "{tmp}/best.pt", "--data", "synthetic:4"], 1, "checkpoint not found",
                           "runs/train/best.pt"),
    "resume file missing": (["train", "--resume", "{tmp}/last.pt"], 2, "--resume {tmp}/last.pt: file not found",
                            "flm train --resume runs/train/last.pt"),
    "image missing": (["detect", "{tmp}/nope.jpg"], 2, "input not found", "flm detect photo.jpg"),
    "bad --norm": (["evaluate", "{tmp}/best.pt", "--data", "synthetic:4", "--norm", "l2"], 2, "unknown --norm 'l2'",
                   "--norm inter-ocular"),
    "bad --threshold": (["evaluate", "{tmp}/best.pt", "--data", "synthetic:4", "--threshold", "-1"], 2,
                        "--threshold is an NME fraction between 0 and 1 (0.08 = 8 %), got -1.0", "--threshold 0.08"),
    "bad evaluate --val-fraction": (["evaluate", "{tmp}/best.pt", "--data", "synthetic:4", "--split", "val",
                                     "--val-fraction", "3"], 2, "between 0 and 1, got 3.0", "--val-fraction 0.15"),
    "bad --min-face": (["detect", "{tmp}/nope.jpg", "--min-face", "-5"], 2,
                       "--min-face must be a whole number of at least 1, got -5", "flm detect photo.jpg"),
    "split of a set without people": (["evaluate", str(REPO / "models" / "flm-68-fast.pt"), "--data",
                                       f"aflw2000:{AFLW}", "--split", "val"],
                                      2, "names no people or photos to split by", "--split all"),
    "CED not a PNG": (["evaluate", "{tmp}/best.pt", "--data", "synthetic:4", "--ced", "{tmp}/ced.txt"], 2,
                      "--ced {tmp}/ced.txt: the CED curve is written as PNG", "--ced ced.png"),
    "bad --img-size": (["train", "--img-size", "-32"], 2, "positive multiple of 32, got -32", "--img-size 128"),
    "bad --lr": (["train", "--lr", "nan"], 2, "--lr must be a positive number, got nan", "--lr 2e-3"),
    "unknown budget": (["check-budget", "shufflenet-heatmap", "--budget", "nope"], 2, "unknown budget 'nope'",
                       "--budget challenge-15mb"),
}


# Each of these pays seconds for importing torch in a fresh interpreter; the other cases, and two
# of these, show that what runs in-process through the same entry point is what a shell sees.
IN_PROCESS = {"checkpoint missing", "resume file missing", "bad --norm", "bad --lr", "bad --threshold",
              "bad evaluate --val-fraction", "bad --min-face",
              "CED not a PNG"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")

    def run(item):
        name, (args, *_) = item
        return name, flm(*[a.replace("{tmp}", str(tmp)) for a in args], timeout=240)

    with ThreadPoolExecutor(3) as pool:
        return tmp, dict(pool.map(run, [(k, v) for k, v in CASES.items() if k not in IN_PROCESS]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line_with_an_example(results, name, capsys):
    tmp, runs = results
    args, code, words, example = CASES[name]
    if name == "split of a set without people" and not AFLW.is_dir():
        pytest.skip(f"needs {AFLW}")
    if name in IN_PROCESS:
        returncode = main([a.replace("{tmp}", str(tmp)) for a in args])
        cap = capsys.readouterr()
        r = subprocess.CompletedProcess(args, returncode, cap.out, cap.err)
    else:
        r = runs[name]
    err = r.stderr
    assert r.returncode == code, err
    assert "Traceback" not in err and "File \"" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and words.replace("{tmp}", str(tmp)) in errors[0], err  # one line says what
    assert lines[lines.index(errors[0]) + 1].startswith("  example: ") and example in err, err  # ...and how
    assert r.stdout == "", r.stdout  # nothing half-done reported on stdout


def test_debug_shows_the_traceback():
    r = flm("--debug", "data", "info", "nosuch:dir")
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "UsageError: unknown dataset format" in r.stderr


def test_a_file_where_an_output_folder_goes_is_one_clear_error(tmp_path, capsys):
    """--out naming a file (or a folder under one), --json naming a folder: exit 2, one line that
    names the file in the way, nothing written beside it (these were tracebacks)."""
    photos = tmp_path / "photos"
    assert main(["sample-photos", "--out", str(photos)]) == 0
    photo = photos / "astronaut.jpg"
    cases = {("sample-photos", "--out", str(photo)): f"{photo} is a file; expected a folder",
             ("detect", str(photo), "--out", str(photo)): f"--out {photo}: {photo} is a file",
             ("detect", str(photo), "--json", str(photos)): f"{photos} is a folder; expected the name of a file",
             ("train", "--synthetic-n", "24", "--epochs", "1", "--img-size", "64", "--workers", "0",
              "--out", str(photo / "run")): f"--out {photo / 'run'}: {photo} is a file"}
    capsys.readouterr()
    before = sorted(p.name for p in photos.iterdir())
    for args, says in cases.items():
        assert main(list(args)) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert says in err and "Traceback" not in err and err.count("error: ") == 1, err
    assert sorted(p.name for p in photos.iterdir()) == before  # no temporaries, no partial output
    # a run that fails before writing anything leaves no empty --out folder behind
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    assert main(["detect", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "annotated")]) == 2
    assert "cannot open video" in capsys.readouterr().err and not (tmp_path / "annotated").exists()
