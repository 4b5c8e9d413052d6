"""Multi-process training under torchrun, for real: 2 CPU processes (gloo) on generated faces.

At the end of a multi-process run every rank hashes its final weights (`state_digest`), the
digests are gathered, and rank 0 logs them (and stops with an error if they differ); the tests
read that line and hold it against the checkpoint on disk.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from flm.errors import UsageError
from flm.pipeline.checkpoint import load_model, read_checkpoint, state_digest
from flm.pipeline.data import open_dataset
from flm.pipeline.train import EpochSampler, TrainConfig, train

COMMON = ["--data", "synthetic:32", "--img-size", "64", "--batch-size", "4", "--workers", "0",
          "--device", "cpu", "--epochs", "2", "--seed", "3"]
STEPS_PER_EPOCH = 3  # 24 training faces (8 held out) / 2 ranks / batch 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def torchrun(*args):
    return run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "flm.cli", "train", *args])


def rank_digests(p) -> dict[str, str]:
    """{rank: digest of its final weights} from the line rank 0 logs at the end of the run."""
    line = re.search(r"final weights sha256 by rank: (.*)", p.stdout + p.stderr)
    assert line, (p.stdout + p.stderr)[-2000:]
    return dict(part.split() for part in line.group(1).strip().split(", "))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2 processes, 2 epochs, uninterrupted."""
    root = tmp_path_factory.mktemp("ddp")
    root.joinpath("digests.json").write_text(json.dumps(rank_digests(torchrun(*COMMON, "--out", str(root / "run")))))
    return root


def test_ranks_hold_identical_weights(full_run):
    digests = json.loads((full_run / "digests.json").read_text())
    assert sorted(digests) == ["rank0", "rank1"]
    assert digests["rank0"] == digests["rank1"]
    # the checkpoint is rank 0's model, unwrapped: no DDP "module." prefix, loads as a plain model
    ck = read_checkpoint(full_run / "run" / "last.pt")
    assert not [k for k in ck["state_dict"] if k.startswith("module.")] and len(ck["state_dict"]) > 10
    assert state_digest(ck["state_dict"]) == digests["rank0"]
    # negative control: the digest sees a change in one weight
    first = next(iter(ck["state_dict"]))
    ck["state_dict"][first] = ck["state_dict"][first] + 1e-6
    assert state_digest(ck["state_dict"]) != digests["rank0"]
    assert ck["world_size"] == 2 and ck["epoch"] == 2
    assert load_model(full_run / "run" / "best.pt").spec.input_size == 64


def test_only_one_checkpoint_set_is_written(full_run):
    names = sorted(p.name for p in (full_run / "run").iterdir())
    assert names == ["best.pt", "curves.png", "last.pt", "metrics.jsonl", "predictions.png"], names
    history = read_metrics(full_run / "run")
    assert [h["epoch"] for h in history] == [1, 2]  # one writer: no duplicated or interleaved lines
    assert [h["step"] for h in history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(h["data_wait_s"] >= 0 for h in history)


@pytest.mark.slow  # over ~20 s here; `just test -m "not slow"` skips it
def test_resume_under_torchrun_matches_the_uninterrupted_run(full_run, tmp_path):
    out = tmp_path / "run"
    # the first epoch through `flm train --nproc 2` (which runs torchrun itself) ...
    run(["-m", "flm.cli", "train", *COMMON, "--out", str(out), "--max-steps", str(STEPS_PER_EPOCH),
         "--nproc", "2"])
    assert [h["epoch"] for h in read_metrics(out)] == [1]
    # ... and the second by resuming under torchrun
    digests = rank_digests(torchrun(*COMMON, "--out", str(out), "--resume", str(out / "last.pt")))
    assert digests["rank0"] == digests["rank1"]
    full, resumed = read_metrics(full_run / "run"), read_metrics(out)
    assert [h["epoch"] for h in resumed] == [1, 2]
    for a, b in zip(full, resumed):
        assert b["val_nme"] == pytest.approx(a["val_nme"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    w_full = read_checkpoint(full_run / "run" / "last.pt")["state_dict"]
    w_res = read_checkpoint(out / "last.pt")["state_dict"]
    assert all(torch.allclose(w_full[k].float(), w_res[k].float(), atol=1e-5) for k in w_full)


def test_resuming_mid_epoch_with_another_process_count_is_refused(full_run, tmp_path):
    ck = read_checkpoint(full_run / "run" / "last.pt")
    ck["step"], ck["epoch"] = 1, 0  # as if stopped by a signal one step into epoch 1, in 2 processes
    torch.save(ck, tmp_path / "mid.pt")
    tr, va = open_dataset("synthetic:32").split_by_identity(0.15, 3)
    cfg = TrainConfig(img_size=64, batch_size=4, workers=0, device="cpu", epochs=2, seed=3,
                      out=str(tmp_path / "run"), resume=str(tmp_path / "mid.pt"))
    with pytest.raises(UsageError, match=r"mid-epoch in 2 process\(es\).*this run has 1"):
        train(cfg, tr, va)


def test_epoch_sampler_shards_one_permutation():
    whole = [i for i, _ in EpochSampler(10, seed=5)]
    shards = []
    for rank in range(3):
        s = EpochSampler(10, seed=5, rank=rank, world=3)
        items = list(s)
        assert len(items) == len(s) == 4 and all(e == 0 for _, e in items)
        shards.append([i for i, _ in items])
    # interleaved, they are the single-process order, wrapped round to fill the last step
    assert [x for row in zip(*shards) for x in row] == whole + whole[:2]
    assert set().union(*map(set, shards)) == set(range(10))
    # a mid-epoch start skips this rank's first items; another epoch is another order
    s = EpochSampler(10, seed=5, rank=1, world=3)
    s.start = 2
    assert [i for i, _ in s] == shards[1][2:] and len(s) == 2
    s.epoch, s.start = 1, 0
    assert [i for i, _ in s] != shards[1]
    # one process: the order is the plain permutation, as before multi-process training existed
    assert whole == np.random.default_rng([5, 0]).permutation(10).tolist()
