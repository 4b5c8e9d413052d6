"""Training never loses work: Ctrl-C / SIGTERM save a resumable checkpoint, resuming gives the
uninterrupted run's numbers, SIGKILL never leaves a torn checkpoint, a NaN keeps the last good
one, and a full disk is one clear error. Real `flm train` subprocesses, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flm.errors import FlmError, ModelFileError, TrainingError
from flm.fileio import atomic_path
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import load_model, read_checkpoint, save_checkpoint
from flm.pipeline.data import open_dataset
from flm.pipeline.train import TrainConfig, train

from tests.helpers.cli import ENV, FLM, TRAIN, Flm

HERE = Path(__file__).resolve().parent
# The signalled runs train on 240 faces (60 people, 51 steps of 4 an epoch, ~2.5 s unloaded) so a
# signal sent 0.05 s after training starts lands mid-epoch even on a fast or busy machine (with
# TRAIN's 10 steps, one CI run saw the whole epoch end first).
SIGNALLED = [*TRAIN, "--synthetic-n", "240", "--epochs", "1"]
STEPS = 51


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """One uninterrupted run and one run each stopped by SIGINT / SIGTERM early in its only
    epoch, all at once; then the SIGINT run resumed. Same command, same seed."""
    root = tmp_path_factory.mktemp("signals")
    args = SIGNALLED
    ref = Flm(*args, "--out", root / "ref")
    runs = {sig: Flm(*args, "--out", root / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, run in runs.items():
        run.wait_for("training shufflenet-heatmap")  # logged once the stop handler is installed
        time.sleep(0.05)  # inside the first of 51 steps
        run.proc.send_signal(sig)
    stopped, resumed = {}, {}
    for sig, run in runs.items():
        code = run.wait()
        last = root / sig.name / "last.pt"
        ck = read_checkpoint(last) if last.is_file() else {}
        stopped[sig] = {"code": code, "stderr": run.stderr, "epoch": ck.get("epoch"), "step": ck.get("step"),
                        "resumable": "optimizer" in ck, "copy": shutil.copy(last, root / f"{sig.name}-stopped.pt")
                        if last.is_file() else None}
        if sig == signal.SIGINT and ck:  # SIGTERM stops through the same flag and save: its checkpoint is checked
            resumed[sig] = Flm(*args, "--out", root / sig.name, "--resume", last)
    return {"root": root, "ref": (ref.wait(), ref.stderr), "stopped": stopped,
            "resumed": {sig: (r.wait(), r.stderr) for sig, r in resumed.items()}}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_130(signalled, sig):
    s = signalled["stopped"][sig]
    assert s["code"] == 130, s["stderr"]
    assert f"received {sig.name}" in s["stderr"] and "stopped by signal; resume with: flm train --resume" in s["stderr"]
    assert "Traceback" not in s["stderr"]
    assert s["resumable"] and s["epoch"] == 0 and 0 < s["step"] < STEPS, s  # stopped mid-epoch
    model = load_model(s["copy"])
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def _final_weights(run: Path) -> dict:
    return load_model(run / "last.pt").state_dict()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_resuming_after_a_signal_mid_epoch_gives_the_uninterrupted_metrics(signalled):
    sig = signal.SIGINT
    code, err = signalled["resumed"][sig]
    assert code == 0, err
    assert signalled["ref"][0] == 0, signalled["ref"][1]
    assert f"at epoch 1 step {signalled['stopped'][sig]['step']}" in " ".join(err.split())
    ref, res = _metrics(signalled["root"] / "ref"), _metrics(signalled["root"] / sig.name)
    assert [m["epoch"] for m in res] == [m["epoch"] for m in ref] == [1]
    for a, b in zip(res, ref):
        assert a["step"] == b["step"] == STEPS and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["val_nme"] == pytest.approx(b["val_nme"], rel=1e-6, abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), "the interrupted epoch's loss"
    # the final weights are the same too, so this is not a coincidence of two numbers
    assert _max_diff(_final_weights(signalled["root"] / "ref"), _final_weights(signalled["root"] / sig.name)) < 1e-5


def test_negative_control_a_resume_from_another_step_does_not_match(signalled, tmp_path, one_torch_thread):
    """The comparison above can fail. The SIGINT checkpoint is resumed here, in this process,
    with the configuration it recorded: as it is, it reproduces the uninterrupted run (so this
    replica is faithful); as if it had stopped one step later (one batch never trained on), the
    final weights differ."""
    ck = read_checkpoint(signalled["stopped"][signal.SIGINT]["copy"])
    config = json.loads(ck["config"])
    config["augment"] = AugmentConfig(**config["augment"])
    tr, va = open_dataset(config["data"][0]).split_by_identity(config["val_fraction"], config["seed"])
    ck["step"] = int(ck["step"]) + 1
    torch.save(ck, tmp_path / "shifted.pt")
    ref = _final_weights(signalled["root"] / "ref")
    diffs = {}
    for name, start in (("same", signalled["stopped"][signal.SIGINT]["copy"]), ("shifted", tmp_path / "shifted.pt")):
        train(TrainConfig(**{**config, "out": str(tmp_path / name), "resume": str(start)}), tr, va)
        diffs[name] = _max_diff(ref, _final_weights(tmp_path / name))
    assert diffs["same"] < 1e-5 and diffs["shifted"] > 1e-4, diffs


@pytest.mark.parametrize("when", ["step 3", "after the last step"])
def test_where_the_signal_lands_decides_between_stopping_and_finishing(when, tmp_path, faces, one_torch_thread,
                                                                       caplog):
    """The same real SIGTERM, sent to this process from the progress callback so it lands on a
    known step: mid-epoch, training stops there with a resumable checkpoint; during the last
    epoch's validation and saves, the run is already complete and says so, and still reports a
    stop (so `flm train` exits 130 and a recipe does not go on to its next stage)."""
    tr, va = faces

    def progress(epoch, step, steps, loss, rec):
        if (when == "step 3" and step == 3 and rec is None) or (when != "step 3" and rec is not None):
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(_cfg(tmp_path, batch_size=2), tr, va, progress=progress)
    ck = read_checkpoint(tmp_path / "last.pt")
    if when == "step 3":
        assert summary["stopped"] == "signal" and (ck["epoch"], ck["step"]) == (0, 3) and not summary["history"]
        assert "nothing to resume" not in caplog.text
    else:  # complete, yet a stop: a recipe must not start its next stage after a Ctrl-C
        assert summary["stopped"] == "signal" and (ck["epoch"], ck["step"]) == (1, 0) and len(summary["history"]) == 1
        assert summary["epochs_done"] == 1
        assert "SIGTERM arrived after the last step: training is complete, nothing to resume" in caplog.text
    assert "received SIGTERM" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow  # over ~20 s here; `just test -m "not slow"` skips it
def test_sigkill_in_the_middle_of_writes_never_leaves_a_torn_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(HERE / "kill_driver.py"), str(out), "7", "7"], capture_output=True,
                       text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["failures"] == 0, r.stderr  # no child ever failed to resume from what it found
    assert counts["killed_in_write"] >= 2 and counts["killed_at_random"] >= 2, counts
    # torn temporaries, never the real files; each child sweeps the ones its predecessor left
    assert counts["left_behind"] >= 1, "no kill landed inside a write: the test proved nothing"
    # On a loaded machine every kill may land in the first write, so a real file may not exist
    # yet: absent is allowed (nothing was replaced), torn is not. A clean finishing run then
    # resumes from whatever is there and must produce both files.
    for name in ("best.pt", "last.pt"):
        if (out / name).is_file():
            model = load_model(out / name)
            assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    args = [sys.executable, "-m", "flm.cli", "train", "--synthetic-n", "48", "--img-size", "64", "--workers", "0",
            "--batch-size", "4", "--seed", "3", "--epochs", "1", "--out", str(out)]
    if (out / "last.pt").is_file():
        args += ["--resume", str(out / "last.pt")]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    # the killed writers' temporaries (up to a checkpoint's size each) were swept on start
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "temporaries of killed writers left behind"
    for name in ("best.pt", "last.pt"):
        load_model(out / name)
    assert "optimizer" in read_checkpoint(out / "last.pt")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    # negative control: a torn file like the temporaries left behind is refused, not half-loaded
    torn = out / "torn.pt"
    torn.write_bytes((out / "last.pt").read_bytes()[: 5_000_000])
    with pytest.raises(ModelFileError, match="torn.pt"):
        load_model(torn)


# --------------------------------------------------------------------------- NaN / inf


@pytest.fixture
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(out, **kw):
    base = dict(model="shufflenet-heatmap", img_size=64, epochs=1, batch_size=8, workers=0, device="cpu",
                out=str(out), seed=1, augment=AugmentConfig.off())
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def faces():
    return open_dataset("synthetic:24:3").split_by_identity(0.25, seed=0)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, faces, one_torch_thread):
    tr, va = faces
    train(_cfg(tmp_path, epochs=1), tr, va)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    before = {p: p.read_bytes() for p in (last, best)}
    with pytest.raises(TrainingError) as err:  # the loss turns NaN at the first step of epoch 2
        train(_cfg(tmp_path, epochs=2, heatmap_sigma=float("nan"), resume=str(last)), tr, va)
    assert "loss became nan at epoch 2 step 1" in str(err.value) and str(last) in str(err.value)
    assert {p: p.read_bytes() for p in (last, best)} == before  # nothing overwritten
    assert all(torch.isfinite(v).all() for v in load_model(last).state_dict().values() if v.is_floating_point())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nan_weights_are_never_saved_as_the_last_good_checkpoint(tmp_path, one_torch_thread):
    """lr=1e30: the first loss is finite, then the weights are ~1e30 and the network's outputs
    overflow. With one step an epoch they reach the end of the epoch, where the validation NME
    is NaN: that must stop training before last.pt is written, not save those weights and call
    them 'the last good checkpoint' when the loss turns NaN a step later."""
    tr, va = open_dataset("synthetic:12:3").split_by_identity(0.25, seed=0)
    assert len(tr) <= 16  # one step an epoch at batch size 16
    with pytest.raises(TrainingError) as err:
        train(_cfg(tmp_path, epochs=2, batch_size=16, lr=1e30), tr, va)
    assert "validation NME became nan after epoch 1" in str(err.value), err.value
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_nan_at_the_first_step_does_not_claim_a_checkpoint_that_does_not_exist(tmp_path, faces, one_torch_thread):
    tr, va = faces
    with pytest.raises(TrainingError, match="epoch 1 step 1") as err:
        train(_cfg(tmp_path, heatmap_weight=float("inf")), tr, va)
    assert not (tmp_path / "last.pt").exists()
    assert "last.pt" not in str(err.value) and "no checkpoint was written" in str(err.value).lower()


# --------------------------------------------------------------------------- full disk


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to simulate a full disk")
def test_a_full_disk_is_a_clear_error_and_the_old_file_stays(tmp_path):
    dest = tmp_path / "last.pt"
    dest.write_bytes(b"the previous, good checkpoint")
    with pytest.raises(FlmError) as err:
        with atomic_path(dest) as tmp:
            os.symlink("/dev/full", tmp)  # every write to it fails with ENOSPC, like a full disk
            with open(tmp, "wb") as f:
                f.write(b"x" * (1 << 20))
    message = str(err.value)
    assert str(dest) in message and "no space left" in message.lower(), message
    assert dest.read_bytes() == b"the previous, good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left behind
    # control: other failures of the writer are not dressed up as a full disk
    with pytest.raises(ValueError, match="unrelated"):
        with atomic_path(dest):
            raise ValueError("unrelated")


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m" if os.geteuid() == 0 else "-rm", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare` and the right to mount a tmpfs in a private "
                                                   "mount namespace (root or user namespaces)")
def test_flm_train_on_a_full_filesystem_is_one_clear_error(tmp_path):
    """A real 16 MB filesystem: best.pt (11 MB) fits, last.pt (32 MB) does not."""
    mnt, keep = tmp_path / "tiny", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    train_cmd = " ".join(f"'{a}'" for a in [*FLM, *TRAIN, "--synthetic-n", "24", "--epochs", "1",
                                            "--out", f"{mnt}/run"])
    script = (f"mount -t tmpfs -o size=16m tmpfs '{mnt}' || exit 77\n"
              f"{train_cmd}\necho \"train-exit=$?\"\n"
              f"ls -a '{mnt}/run'\ncp '{mnt}/run/best.pt' '{keep}/' 2>/dev/null\n")
    r = subprocess.run(["unshare", "-m" if os.geteuid() == 0 else "-rm", "sh", "-c", script], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode != 77, r.stderr
    assert "train-exit=1" in r.stdout, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and f"error: {mnt}/run/last.pt" in err and "no space left" in err.lower(), err
    listing = r.stdout.split("train-exit=1")[1].split()
    assert "last.pt" not in listing and not [n for n in listing if n.endswith(".tmp")], listing
    assert load_model(keep / "best.pt").spec.input_size == 64  # what was written before is whole


def test_sweep_removes_only_the_temporaries_of_writers_that_are_gone(tmp_path):
    from flm.fileio import atomic_path, sweep_temporaries
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid = int(dead.stdout)  # this process has exited
    stale = tmp_path / f".last.pt.{gone_pid}-abc123.tmp"
    stale.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".model.mlpackage.{gone_pid}-def456.tmp.mlpackage"
    stale_dir.mkdir()
    keep = tmp_path / "best.pt"
    keep.write_bytes(b"y")
    with atomic_path(tmp_path / "last.pt") as live:  # negative control: a live writer's temporary stays
        live.write_bytes(b"z")
        assert sweep_temporaries(tmp_path) == 2
        assert live.exists() and keep.exists() and not stale.exists() and not stale_dir.exists()
    assert (tmp_path / "last.pt").read_bytes() == b"z" and sweep_temporaries(tmp_path) == 0
