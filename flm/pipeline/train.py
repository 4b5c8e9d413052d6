"""`flm train`: fit a preset on a landmark dataset, on CPU by default.

Checkpoints (`last.pt` every epoch, `best.pt` on a new best validation NME) are atomic and
hold everything `--resume` needs to continue exactly: weights, optimiser, schedule, epoch,
step within the epoch, history. Augmentation and shuffling are pure functions of
(seed, epoch, index), so a resumed run sees the same batches an uninterrupted one would.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set, WORLD_SIZE > 1) the same function runs in
every process: it joins the process group (gloo on CPU, nccl on CUDA), wraps the model in
DistributedDataParallel, and each rank takes its shard of the same (seed, epoch) permutation,
so `--batch-size` is per process and one step sees batch-size x processes faces. Validation is
sharded the same way and its NME summed across ranks; BatchNorm statistics are taken from rank
0 (as DDP does before every forward) before validating. Only rank 0 writes checkpoints (of the
unwrapped model) and metrics. Resume works as in one process; resuming mid-epoch needs the
same number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from flm.errors import TrainingError, UsageError
from flm.fileio import atomic_path, sweep_temporaries
from flm.geometry import gaussian_heatmaps, nme, normaliser
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import read_checkpoint, save_checkpoint
from flm.pipeline.data import LandmarkDataset
from flm.pipeline.evaluate import CropDataset, point_subset, predict_crops
from flm.pipeline.models import LandmarkModel, build_model, count_parameters

log = logging.getLogger("flm")


@dataclass
class TrainConfig:
    model: str = "shufflenet-heatmap"
    data: str = "synthetic"
    val: str | None = None
    val_fraction: float = 0.15
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    img_size: int | None = None
    width: float | None = None
    out: str = "runs/train"
    device: str = "auto"
    seed: int = 0
    workers: int = 1
    heatmap_weight: float = 0.5  # weight of the heatmap KL term next to the coordinate L1 term
    heatmap_sigma: float = 1.0  # target Gaussian sigma, in heatmap cells
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_steps: int | None = None  # stop early (tests, smoke runs)
    resume: str | None = None
    init: str | None = None  # start from these weights (fine-tuning, e.g. at a larger --img-size)
    skip_bad: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", example="flm train --device auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: no Apple GPU is available", example="flm train --device auto")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {name!r}", example="flm train --device auto")
    return torch.device(name)


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun with WORLD_SIZE > 1, join the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if device.type == "mps":
        raise UsageError("multi-process training runs on CPU (gloo) or CUDA (nccl), not on mps",
                         example="torchrun --nproc-per-node 2 -m flm.cli train --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class EpochSampler(Sampler):
    """Yields (index, epoch) in an order fixed by (seed, epoch); can start mid-epoch.

    With `world` > 1, rank r takes items r, r + world, ... of the same permutation, padded by
    wrapping round (DistributedSampler's rule) so every rank gets as many items: the ranks
    step together and between them cover the whole epoch. `start` counts this rank's items.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        if self.world > 1:
            per_rank = -(-self.n // self.world)
            order = np.resize(order, per_rank * self.world)[self.rank::self.world]
        return iter([(int(i), self.epoch) for i in order[self.start:]])

    def __len__(self):
        return -(-self.n // self.world) - self.start


def landmark_loss(model: LandmarkModel, raw: torch.Tensor, target: torch.Tensor, cfg: TrainConfig):
    """L1 on coordinates (in heatmap cells / 8-pixel units) + KL to a Gaussian for heatmap models.

    The coordinate term trains the soft-argmax the exported graph uses; the heatmap term keeps
    each map a single sharp peak, which the expectation alone does not enforce.
    """
    spec = model.spec
    pred = model.decode(raw)
    unit = spec.input_size / spec.heatmap_size if spec.heatmap_size else 8.0
    loss = (pred - target).abs().mean() / unit
    if spec.output == "heatmap" and cfg.heatmap_weight > 0:
        t = np.stack([gaussian_heatmaps(p, spec.heatmap_size, spec.input_size, cfg.heatmap_sigma)
                      for p in target.detach().cpu().numpy()])
        t = torch.from_numpy(t).to(raw.device).flatten(2)
        logp = F.log_softmax(raw.flatten(2), dim=-1)
        kl = (t * (torch.log(t.clamp_min(1e-12)) - logp)).sum(-1).mean()
        loss = loss + cfg.heatmap_weight * kl
    return loss


def _val_errors(model, val: LandmarkDataset, device) -> np.ndarray:
    pred, gt = predict_crops(model, val, device=device)
    # NME is invariant to the crop's similarity transform, so crop space gives the image-space value
    return nme(pred, gt, normaliser(gt, "inter-ocular", model.spec.scheme))


def _val_nme(model, val: LandmarkDataset, device, rank: int = 0, world: int = 1) -> float:
    if world == 1:
        return float(_val_errors(model, val, device).mean())
    # each rank scores every world-th face; sums and counts are added up, so all ranks agree
    part = val.subset(range(rank, len(val), world), f"rank{rank}")
    err = _val_errors(model, part, device) if len(part) else np.zeros(0)
    total, count = _all_sum([float(err.sum()), float(err.size)], device)
    return total / count


def _write_metrics(out: Path, history: list[dict]) -> None:
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


def _load_init_weights(model: LandmarkModel, path: str) -> None:
    """Copy weights from another checkpoint of the same preset (any input size: the presets'
    weights do not depend on it, except simple-cnn's first FC layer, which is then refused)."""
    ck = read_checkpoint(path)
    src = json.loads(ck["spec"]).get("preset")
    if src != model.spec.preset:
        raise UsageError(f"--init {path} holds a {src!r} model, not {model.spec.preset!r}",
                         example=f"flm train --model {src} --init {path}")
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise UsageError(f"--init {path}: weights do not fit this configuration: "
                         f"{str(e).splitlines()[0][:200]}") from None
    log.info("initialised from %s", path)


def _last_good(out: Path) -> str:
    last = out / "last.pt"
    return f"The last good checkpoint is {last}." if last.is_file() else "No checkpoint was written yet."


def _ignore_stop_signals(worker_id: int) -> None:
    # A Ctrl-C or `kill` aimed at the whole process group must reach only the main process, which
    # saves and stops; a worker dying of it first would surface as a DataLoader traceback instead.
    # Workers still exit when the main process goes (torch's worker watchdog).
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class _StopFlag:
    """SIGINT / SIGTERM ask training to stop at the next step boundary and save."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a resumable checkpoint after this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, train_ds: LandmarkDataset, val_ds: LandmarkDataset, progress=None) -> dict:
    """Train; returns a summary. `progress(epoch, step, steps, loss, val_nme)` is called as it goes."""
    rank, world, device = join_process_group(pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        sweep_temporaries(out)
    options = {"width": cfg.width} if cfg.width is not None else {}
    model = build_model(cfg.model, cfg.img_size, options)
    model.build_options = options
    if cfg.init and not cfg.resume:
        _load_init_weights(model, cfg.init)
    spec = model.spec.with_(training_data=train_ds.name if not cfg.init else f"{train_ds.name} (from {cfg.init})")
    model.spec = spec
    model.to(device)

    ds = CropDataset(train_ds, spec, cfg.augment, cfg.seed, point_subset(spec, train_ds))
    sampler = EpochSampler(len(ds), cfg.seed, rank=rank, world=world)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        worker_init_fn=_ignore_stop_signals,
                        drop_last=len(sampler) > cfg.batch_size, persistent_workers=False)
    steps_per_epoch = max(1, len(loader))
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(200, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    epoch, start_step, history, best = 0, 0, [], float("inf")
    carry = [0.0, 0]  # loss sum and count of this epoch's steps before a mid-epoch resume
    if cfg.resume:
        ck = read_checkpoint(cfg.resume)
        if "optimizer" not in ck:
            raise UsageError(f"{cfg.resume}: holds no training state to resume from (a best.pt?); "
                             "resume from last.pt", example=f"flm train --resume {out / 'last.pt'}")
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        epoch, start_step = int(ck["epoch"]), int(ck["step"])
        if start_step and int(ck.get("world_size", 1)) != world:
            raise UsageError(f"{cfg.resume} stopped mid-epoch in {int(ck.get('world_size', 1))} process(es); "
                             f"resume it with as many (this run has {world})",
                             example=f"flm train --nproc {int(ck.get('world_size', 1))} --resume {cfg.resume}")
        history = json.loads(ck["history"])
        best = float(ck["best_nme"])
        torch.set_rng_state(ck["torch_rng"])
        if start_step and rank == 0:  # so the epoch's train_loss is over all its steps, as uninterrupted
            carry = [float(v) for v in ck.get("epoch_loss", (0.0, 0))]
        log.info("resumed from %s at epoch %d step %d", cfg.resume, epoch + 1, start_step)

    def state(ep, st, epoch_loss=(0.0, 0)):
        return dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=ep, step=st,
                    history=json.dumps(history), best_nme=best, torch_rng=torch.get_rng_state(),
                    config=json.dumps(asdict(cfg), default=str), world_size=world,
                    epoch_loss=[float(v) for v in epoch_loss])

    # after resuming: DDP starts every rank from rank 0's weights and averages gradients
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    if rank == 0:
        log.info("training %s (%s parameters) on %d faces, validating on %d, %s%s",
                 cfg.model, f"{count_parameters(model):,}", len(train_ds), len(val_ds), device,
                 f" x {world} processes" if world > 1 else "")
    t0, global_step, stopped = time.perf_counter(), epoch * steps_per_epoch + start_step, None
    with _StopFlag() as stop:
        while epoch < cfg.epochs and stopped is None:
            model.train()
            sampler.epoch, sampler.start = epoch, start_step * cfg.batch_size
            losses, step, data_s, waiting = [], start_step, 0.0, time.perf_counter()
            for x, target, _ in loader:
                data_s += time.perf_counter() - waiting  # time this step waited for the loader
                x, target = x.to(device), target.to(device)
                loss = landmark_loss(model, net(x), target, cfg)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                                        f"stopped. {_last_good(out)} Try a lower --lr.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                global_step += 1
                if progress:
                    progress(epoch, step, steps_per_epoch, losses[-1], None)
                signalled = stop.signum is not None
                if world > 1:  # stop on the same step everywhere, or the others wait forever
                    signalled = _all_sum([float(signalled)], device)[0] > 0
                if signalled or (cfg.max_steps and global_step >= cfg.max_steps):
                    stopped = "signal" if signalled else "max-steps"
                    break
                waiting = time.perf_counter()
            loss_sum, loss_count = float(np.sum(losses)) + carry[0], len(losses) + carry[1]
            carry = [0.0, 0]
            if stopped == "signal":
                if world > 1:
                    loss_sum, loss_count = _all_sum([loss_sum, float(loss_count)], device)
                if rank == 0:
                    save_checkpoint(out / "last.pt", model, **state(epoch, step, (loss_sum, loss_count)))
                break
            train_loss = loss_sum / loss_count if loss_count else None
            if world > 1:
                for b in model.buffers():  # BatchNorm statistics: rank 0's, as DDP uses them
                    dist.broadcast(b, 0)
                loss_sum, loss_count = _all_sum([loss_sum, float(loss_count)], device)
                train_loss = loss_sum / loss_count if loss_count else None
            val = _val_nme(model, val_ds, device, rank, world)
            if not math.isfinite(val):  # NaN/inf weights: never save them as the last good checkpoint
                raise TrainingError(f"validation NME became {val} after epoch {epoch + 1} (step {global_step}); "
                                    f"stopped without saving these weights. {_last_good(out)} Try a lower --lr.")
            rec = {"epoch": epoch + 1, "step": global_step, "train_loss": train_loss,
                   "val_nme": val, "lr": sched.get_last_lr()[0], "time_s": round(time.perf_counter() - t0, 1),
                   "data_wait_s": round(data_s, 3)}
            history.append(rec)
            if progress:
                progress(epoch, step, steps_per_epoch, rec["train_loss"], val)
            epoch, start_step = epoch + 1, 0
            if val < best:
                best = val
                if rank == 0:
                    save_checkpoint(out / "best.pt", model, epoch=epoch, val_nme=val)
            if rank == 0:
                save_checkpoint(out / "last.pt", model, **state(epoch, 0))
                _write_metrics(out, history)
    if os.environ.get("FLM_DUMP_WEIGHTS_DIR"):  # test hook: every process saves its final weights
        dump = Path(os.environ["FLM_DUMP_WEIGHTS_DIR"])
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), dump / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()  # no rank leaves while rank 0 still writes
        dist.destroy_process_group()
    return {"out": str(out), "epochs_done": epoch, "best_val_nme": best, "history": history,
            "stopped": stopped, "wall_s": time.perf_counter() - t0}
