"""SIGKILL training processes at random moments, many of them in the middle of a checkpoint write.

Usage: python kill_driver.py OUT SECONDS [SEED]. Prints one JSON line of counts.

torch is imported once here; each round forks a child that really trains (resuming from
OUT/last.pt when there is one, so every surviving last.pt is also resumed from) and writes
best.pt / last.pt / metrics.jsonl through the normal code path. Forking spares each round the
seconds a fresh interpreter needs to import torch, so a bounded run gets many kills. Every
other round the child is killed within 20 ms of a new checkpoint temporary appearing (so
inside the write), the others at a random time. A child that dies by itself (for example
because last.pt was unreadable) is counted as a failure.
"""

import json
import os
import random
import signal
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

from flm.pipeline.augment import AugmentConfig  # noqa: E402
from flm.pipeline.data import open_dataset  # noqa: E402
from flm.pipeline.train import TrainConfig, train  # noqa: E402


def child(out: str) -> None:
    tr, va = open_dataset("synthetic:20:5").split_by_identity(0.25, seed=0)
    last = os.path.join(out, "last.pt")
    cfg = TrainConfig(model="shufflenet-heatmap", img_size=64, epochs=1_000_000, batch_size=16, workers=0,
                      device="cpu", out=out, seed=1, augment=AugmentConfig.off(),
                      resume=last if os.path.exists(last) else None)
    train(cfg, tr, va)


def temporaries(out: str) -> set[str]:
    return {n for n in os.listdir(out) if n.endswith(".tmp")}


def main() -> None:
    out, seconds = sys.argv[1], float(sys.argv[2])
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    os.makedirs(out, exist_ok=True)
    end = time.monotonic() + seconds
    # left_behind: kills after which a torn temporary lay in OUT (the next child sweeps it away)
    counts = {"rounds": 0, "killed_in_write": 0, "killed_at_random": 0, "failures": 0, "left_behind": 0}
    while time.monotonic() < end:
        before = temporaries(out)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(out)
            except BaseException:  # noqa: BLE001 - reported through the exit code
                traceback.print_exc()
                code = 3
            os._exit(code)
        in_write = counts["rounds"] % 2 == 0
        deadline = time.monotonic() + (8.0 if in_write else rng.uniform(0.3, 3.0))
        exited = False
        while time.monotonic() < deadline:
            if in_write and temporaries(out) - before:
                time.sleep(rng.uniform(0.0, 0.02))
                break
            exited = os.waitpid(pid, os.WNOHANG)[0] != 0
            if exited:
                break
            time.sleep(0.001)
        else:
            in_write = False  # no write started in time: a random kill after all
        if not exited:
            os.kill(pid, signal.SIGKILL)
            exited = os.WIFEXITED(os.waitpid(pid, 0)[1])  # it may have just stopped by itself
        if exited:  # it stopped by itself: training must never do that here
            counts["failures"] += 1
        else:
            counts["killed_in_write" if in_write else "killed_at_random"] += 1
            counts["left_behind"] += bool(temporaries(out) - before)
        counts["rounds"] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
