"""Training throughput: images/s with 1 and with 2 processes (torchrun, DDP), CPU and GPU.

    python benchmarks/train_throughput.py [--steps 20] [--batch-size 16] [--workers 1]
                                          [--json benchmarks/results/train_throughput.json]

Each configuration is a real `flm.pipeline.train.train` run launched by
`python -m torch.distributed.run --standalone --nproc-per-node N` (N = 1 runs the plain
single-process path) on the built-in synthetic faces, rendered on the fly by the DataLoader's
worker processes, with augmentation on: the preset's default input size, `--batch-size` per
process. Images/s counts every process's images over the steps after `--warmup`, from rank 0's
step timestamps (DDP keeps the ranks in step). One process runs twice: with torch's default
thread count (what `flm train` does) and with one thread; with N > 1 processes torchrun gives
each OMP_NUM_THREADS=1, so "2 processes vs 1 process, 1 thread" is the DDP scaling alone.

Is data loading the bottleneck? Two numbers answer it: the time the training loop waited for
the next batch (`data_wait_s` in the run's metrics, first batch and worker start-up included)
as a share of the loop, and the loader alone (same dataset, same workers, no model) in
images/s per process, next to the training images/s per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """Runs inside torchrun: one training run; rank 0 writes its timings to --result."""
    from flm.pipeline.data import open_dataset
    from flm.pipeline.train import TrainConfig, train

    rank = int(os.environ.get("RANK", "0"))
    ds = open_dataset(f"synthetic:{args.faces}")
    tr, va = ds.split_by_identity(0.15, 0)
    stamps = []
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, workers=args.workers, device=args.device,
                      epochs=1, max_steps=args.warmup + args.steps, out=args.out, seed=0)
    started = time.perf_counter()
    summary = train(cfg, tr, va, lambda epoch, step, steps, loss, val: stamps.append(time.perf_counter())
                    if val is None else None)
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        steady = stamps[-1] - stamps[args.warmup - 1]
        loop = stamps[-1] - started
        rec = summary["history"][-1]
        Path(args.result).write_text(json.dumps({
            "processes": world, "device": args.device, "steps_timed": args.steps,
            "images_per_s": args.steps * args.batch_size * world / steady,
            "step_s": steady / args.steps, "data_wait_s": rec["data_wait_s"], "loop_s": loop,
            "data_wait_share": rec["data_wait_s"] / loop,
            "threads_per_process": __import__("torch").get_num_threads()}))


def loader_only(args, seconds: float = 15.0) -> float:
    """Images/s of the training DataLoader alone (one process, same workers and augmentation)."""
    from torch.utils.data import DataLoader

    from flm.pipeline.augment import AugmentConfig
    from flm.pipeline.data import open_dataset
    from flm.pipeline.evaluate import CropDataset
    from flm.pipeline.models import build_model
    from flm.pipeline.train import EpochSampler

    spec = build_model(args.model).spec
    ds = CropDataset(open_dataset(f"synthetic:{args.faces}"), spec, AugmentConfig(), 0)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), 0),
                        num_workers=args.workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, t0 = 0, time.perf_counter()
    for x, _, _ in it:
        n += len(x)
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def launch(args, nproc: int, device: str, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--out", str(Path(tmp) / "run"), "--result", str(result),
               "--device", device, "--model", args.model, "--faces", str(args.faces),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{nproc}-process {device} run failed:\n{p.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shufflenet-heatmap")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per training process")
    ap.add_argument("--faces", type=int, default=0, help="synthetic set size (default: enough for one epoch)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # one epoch must hold every step for 2 processes (85 % of the faces train)
    args.faces = args.faces or int((args.warmup + args.steps) * args.batch_size * 2 / 0.85) + 8
    if args.worker:
        return worker(args)

    import torch

    from rich.console import Console
    from rich.table import Table

    from flm.fileio import atomic_path

    rows = [launch(args, 1, "cpu"), launch(args, 1, "cpu", threads=1), launch(args, 2, "cpu")]
    gpu_note = None
    if torch.cuda.is_available():
        rows.append(launch(args, 1, "cuda"))
        if torch.cuda.device_count() >= 2:
            rows.append(launch(args, 2, "cuda"))
        else:
            gpu_note = "one GPU here: no 2-process GPU run"
    else:
        gpu_note = "no GPU here"
    loader = loader_only(args)
    for r in rows:  # against the first 1-process run on the same device (default threads)
        first = next(b for b in rows if b["device"] == r["device"] and b["processes"] == 1)
        one_thread = [b for b in rows if b["device"] == r["device"] and b["processes"] == 1
                      and b["threads_per_process"] == 1]
        r["ratio_vs_1_process"] = r["images_per_s"] / first["images_per_s"]
        r["ratio_vs_1_process_1_thread"] = r["images_per_s"] / one_thread[0]["images_per_s"] if one_thread else None

    t = Table(title=f"training throughput, {args.model}, batch {args.batch_size}/process, "
                    f"{args.workers} loader worker(s)/process, {os.cpu_count()} CPU cores")
    for col in ("device", "processes", "threads/proc", "images/s", "vs 1 process", "vs 1 process, 1 thread",
                "s/step", "waiting for data"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["device"], str(r["processes"]), str(r["threads_per_process"]), f"{r['images_per_s']:.1f}",
                  f"{r['ratio_vs_1_process']:.2f}x",
                  f"{r['ratio_vs_1_process_1_thread']:.2f}x" if r["ratio_vs_1_process_1_thread"] else "-",
                  f"{r['step_s']:.2f}",
                  f"{100 * r['data_wait_share']:.0f} % ({r['data_wait_s']:.1f} s)")
    console = Console(width=140)
    console.print(t)
    console.print(f"loader alone (1 process, {args.workers} worker(s), augmentation on): {loader:.1f} images/s")
    if gpu_note:
        console.print(gpu_note)
    load = os.getloadavg()
    report = {"model": args.model, "batch_size_per_process": args.batch_size, "workers": args.workers,
              "steps_timed": args.steps, "cpu_count": os.cpu_count(), "load_average_1_5_15": load,
              "torch": torch.__version__, "runs": rows, "loader_only_images_per_s": loader, "gpu_note": gpu_note,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores "
                  f"(other jobs share them); wrote {args.json}")


if __name__ == "__main__":
    main()
