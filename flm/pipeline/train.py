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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from flm.errors import TrainingError, UsageError, check_at_least
from flm.fileio import atomic_path, output_folder, sweep_temporaries
from flm.geometry import gaussian_heatmaps, nme, normaliser
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import load_model, read_checkpoint, save_checkpoint, state_digest
from flm.pipeline.data import LandmarkDataset, Source, open_sources
from flm.pipeline.evaluate import (CropDataset, check_val_fraction, head_of, mean_shape_baseline, point_subset,
                                   predict_crops, yaw_bin_masks)
from flm.pipeline.reports import write_training_reports
from flm.pipeline.models import (HEAD_LAYERS, LandmarkModel, build_model, check_upsample, count_parameters,
                                 get_preset, memory_format, preset_options)

log = logging.getLogger("flm")


@dataclass
class TrainConfig:
    model: str = "shufflenet-heatmap"
    data: list[str] = field(default_factory=lambda: ["synthetic"])  # FORMAT:PATH[@WEIGHT] each
    val: list[str] = field(default_factory=lambda: ["split"])  # FORMAT:PATH, or "split" (see `validation_sets`)
    select: str = "mean"  # the validation set whose score picks best.pt, the mean over all of them, or last
    heads: bool = True  # one output head per annotation convention when the sources follow several
    val_fraction: float = 0.15
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    img_size: int | None = None
    width: float | None = None
    head: list[int] | None = None  # heatmap head channels (two deconvolutions), for presets that have one
    gate: bool = False  # with several conventions: learn which one a face's source follows, answer in it
    upsample: str | None = None  # the heatmap head's x2 steps: deconv (the preset's) or light
    trunk_lr: float = 1.0  # the trunk's learning rate as a fraction of lr (0: kept as --init gave it)
    teacher: str | None = None  # a trained checkpoint whose heatmaps the model learns too (distillation)
    teacher_weight: float = 1.0  # weight of the KL to the teacher's heatmaps, beside the usual loss
    out: str = "runs/train"
    device: str = "auto"
    seed: int = 0
    workers: int = 1
    heatmap_weight: float = 0.5  # weight of the heatmap KL term next to the coordinate L1 term
    heatmap_sigma: float = 1.0  # target Gaussian sigma, in heatmap cells
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    flip_for: dict = field(default_factory=dict)  # convention -> flip probability, instead of augment.flip
    flip_shift_for: dict = field(default_factory=dict)  # convention -> its labels' x offset (augment.flip_shift)
    max_steps: int | None = None  # stop early (tests, smoke runs)
    stop_epoch: int | None = None  # stop after this many epochs of the `epochs`-long schedule (recipes)
    resume: str | None = None
    init: str | None = None  # start from these weights (fine-tuning, e.g. at a larger --img-size)
    skip_bad: bool = False

    def preset_options(self) -> dict:
        """The preset options this config sets (the others keep the preset's defaults)."""
        return preset_options(self.width, self.head, self.gate, self.upsample)


def check_options(lr: float, aug_strength: float, aug_crop: float, aug_flip: float, aug_pose: float,
                  aug_pose_yaw: float, flip_for: dict | None = None, flip_shift_for: dict | None = None) -> None:
    """UsageError for an option out of its range (`flm train` and recipes alike)."""
    for name, p in (flip_for or {}).items():
        if not (_is_number(p) and 0 <= p <= 1):
            raise UsageError(f"--aug-flip-for {name}={p}: expected NAME=P with P between 0 and 1",
                             example="flm train --aug-flip 0 --aug-flip-for 300w-train=0.5")
    for name, px in (flip_shift_for or {}).items():
        if not (_is_number(px) and abs(px) <= 10):
            raise UsageError(f"--aug-flip-shift-for {name}={px}: expected NAME=PX with PX pixels between -10 and 10",
                             example="flm train --aug-flip-shift-for 300w-train=1.0")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr}", example="flm train --lr 2e-3")
    for name, value in (("--aug-strength", aug_strength), ("--aug-crop", aug_crop)):
        if not (0 <= value <= 3):
            raise UsageError(f"{name} must be between 0 and 3, got {value}", example=f"flm train {name} 0.5")
    for name, value in (("--aug-flip", aug_flip), ("--aug-pose", aug_pose)):
        if not (0 <= value <= 1):
            raise UsageError(f"{name} is a probability between 0 and 1, got {value}",
                             example=f"flm train {name} 0")
    if not (0 <= aug_pose_yaw <= 75):
        raise UsageError(f"--aug-pose-yaw must be between 0 and 75 degrees, got {aug_pose_yaw}",
                         example="flm train --aug-pose 0.5 --aug-pose-yaw 50")


def check_trunk_lr(model: str, trunk_lr: float) -> None:
    """UsageError unless `trunk_lr` is a fraction 0-1, and 1 for presets without a heatmap head."""
    if not (0 <= trunk_lr <= 1):
        raise UsageError(f"--trunk-lr is a fraction of --lr between 0 and 1, got {trunk_lr}",
                         example="flm train --init models/flm-68.pt --upsample light --trunk-lr 0.1")
    if trunk_lr != 1 and "head" not in get_preset(model).options:
        raise UsageError(f"--trunk-lr is for presets with a heatmap head; {model!r} has none",
                         example="flm train --model shufflenet-heatmap --trunk-lr 0.1")


def check_teacher_weight(weight: float) -> None:
    """UsageError unless the teacher's weight is a positive number."""
    if not (math.isfinite(weight) and weight > 0):
        raise UsageError(f"--teacher-weight must be a positive number, got {weight}",
                         example="flm train --teacher models/flm-68.pt --teacher-weight 1")


def check_model_options(model: str, upsample: str | None, trunk_lr: float, teacher_weight: float) -> None:
    """UsageError for a bad --upsample, --trunk-lr or --teacher-weight (`flm train` and recipes alike)."""
    check_upsample(upsample)
    check_trunk_lr(model, trunk_lr)
    check_teacher_weight(teacher_weight)


# whole-number options and their smallest value (None, where allowed, means "not set")
_COUNTS = (("--epochs", "epochs", 1), ("--batch-size", "batch_size", 1), ("--workers", "workers", 0),
           ("--seed", "seed", 0), ("--max-steps", "max_steps", 1), ("stop_epoch", "stop_epoch", 1))


def check_counts(cfg: TrainConfig) -> None:
    """UsageError for a count below its range or a --val-fraction outside (0, 1) (`flm train` and
    recipes alike), before torch or the data loader meet it."""
    for flag, name, least in _COUNTS:
        usual = TrainConfig.__dataclass_fields__[name].default
        check_at_least(flag, getattr(cfg, name), least, f"flm train {flag} {usual if usual is not None else least}")
    check_val_fraction(cfg.val_fraction, "flm train --val-fraction 0.15")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# the per-convention options: the TrainConfig field each fills, and a value for their examples
_PER_CONVENTION = {"--aug-flip-for": ("flip_for", "0.5"), "--aug-flip-shift-for": ("flip_shift_for", "1.0")}


def check_convention_names(cfg: TrainConfig) -> None:
    """UsageError for a per-convention option (--aug-flip-for, --aug-flip-shift-for) naming no --data
    source: a typo would otherwise change nothing, silently."""
    known = sorted({Source.parse(text).convention for text in cfg.data})
    for option, (field_name, value) in _PER_CONVENTION.items():
        for name in getattr(cfg, field_name):
            if name not in known:
                raise UsageError(f"{option} {name}: no --data source follows a convention of that name; "
                                 f"known: {', '.join(known)}", example=f"flm train {option} {known[0]}={value}")


def config_from_options(options: dict) -> TrainConfig:
    """The TrainConfig of `flm train`'s options (by their parameter names), each checked first:
    one clear error for a bad value, before any data is read."""
    o = options
    get_preset(o["model"])
    check_model_options(o["model"], o.get("upsample"), o.get("trunk_lr", 1.0), o.get("teacher_weight", 1.0))
    flip_for = dict(_name_number(item, "--aug-flip-for") for item in o.get("aug_flip_for") or [])
    flip_shift_for = dict(_name_number(item, "--aug-flip-shift-for") for item in o.get("aug_flip_shift_for") or [])
    check_options(o["lr"], o["aug_strength"], o["aug_crop"], o["aug_flip"], o["aug_pose"], o["aug_pose_yaw"],
                  flip_for, flip_shift_for)
    for name in ("resume", "init", "teacher"):
        if o.get(name) is not None and not Path(o[name]).is_file():
            raise UsageError(f"--{name} {o[name]}: file not found",
                             example=f"flm train --{name} runs/train/{'last' if name == 'resume' else 'best'}.pt")
    augment = AugmentConfig.from_options(o["aug_strength"], o["aug_crop"], o["aug_flip"], o["aug_pose"],
                                         o["aug_pose_yaw"])
    plain = {k: o[k] for k in ("model", "select", "heads", "val_fraction", "batch_size", "lr", "img_size", "width",
                               "device", "seed", "workers", "max_steps", "skip_bad", "gate", "upsample",
                               "trunk_lr", "teacher_weight") if k in o}
    epochs = o.get("epochs")
    cfg = TrainConfig(**plain, data=list(o.get("data") or [f"synthetic:{o.get('synthetic_n', 1200)}"]),
                      val=list(o.get("val") or ["split"]), epochs=(30 if o.get("data") else 4) if epochs is None else epochs,
                      head=_channels(o.get("head")), out=str(o.get("out", "runs/train")),
                      resume=_text(o.get("resume")), init=_text(o.get("init")), teacher=_text(o.get("teacher")),
                      augment=augment, flip_for=flip_for, flip_shift_for=flip_shift_for)
    check_counts(cfg)
    check_convention_names(cfg)
    return cfg


def _text(path) -> str | None:
    return None if path is None else str(path)


def _channels(value: str | None) -> list[int] | None:
    """`--head C1,C2` -> [C1, C2]."""
    if value is None:
        return None
    parts = str(value).split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--head {value!r}: expected two positive channel counts C1,C2", example="flm train --head 128,96")
    return [int(p) for p in parts]


def _name_number(item: str, option: str) -> tuple[str, float]:
    """`--aug-flip-for NAME=P`, `--aug-flip-shift-for NAME=PX` -> (NAME, number); its range is
    `check_options`'s."""
    name, _, text = item.partition("=")
    try:
        value = float(text)
    except ValueError:
        value = None
    if not name or value is None:
        raise UsageError(f"{option} {item!r}: expected NAME=NUMBER (NAME a --data folder name)",
                         example=f"flm train {option} 300w-train={_PER_CONVENTION[option][1]}")
    return name, value


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

    `weights` (one per item, default 1) say how often an item is drawn per epoch: 2 = twice,
    0.5 = in a random half of the epochs' draws - per source, so a source of weight w gives
    round(w x its size) items each epoch. With `world` > 1, rank r takes items r, r + world, ...
    of the same permutation, padded by wrapping round (DistributedSampler's rule) so every rank
    gets as many items: the ranks step together and between them cover the whole epoch. `start`
    counts this rank's items.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 weights=None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world = rank, world
        self.weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        self.epoch, self.start = 0, 0
        fractions = self.weights % 1.0
        self.total = int(np.floor(self.weights).sum()) + sum(  # the length of `_draws`, whatever the rng
            int(round(w * np.isclose(fractions, w).sum())) for w in np.unique(fractions) if w > 0)

    def _draws(self, rng) -> np.ndarray:
        """Every item floor(w) times, plus a random share of the fractional parts (per weight value)."""
        out = [np.repeat(np.arange(self.n), np.floor(self.weights).astype(int))]
        for w in np.unique(self.weights % 1.0):
            members = np.flatnonzero(np.isclose(self.weights % 1.0, w)) if w > 0 else []
            if len(members):
                out.append(rng.choice(members, int(round(w * len(members))), replace=False))
        return np.concatenate(out).astype(int)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = self._draws(rng)
        order = rng.permutation(draws) if self.shuffle else np.sort(draws)
        if self.world > 1:
            per_rank = -(-len(order) // self.world)
            order = np.resize(order, per_rank * self.world)[self.rank::self.world]
        return iter([(int(i), self.epoch) for i in order[self.start:]])

    def __len__(self):
        return -(-self.total // self.world) - self.start


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
        loss = loss + cfg.heatmap_weight * heatmap_kl(torch.from_numpy(t).to(raw.device).flatten(2), raw)
    return loss


def heatmap_kl(target: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(raw)) of every map, averaged: `target` (N, K, H*W) probabilities, `raw`
    (N, K, H, W) heatmap logits."""
    logp = F.log_softmax(raw.flatten(2), dim=-1)
    return (target * (torch.log(target.clamp_min(1e-12)) - logp)).sum(-1).mean()


@dataclass
class ValSet:
    """A validation set scored every epoch: NME by `norm`, through output head `head`."""

    name: str
    ds: LandmarkDataset
    norm: str = "inter-ocular"
    head: int | None = None


def _val_score(model, val: ValSet, device, rank: int = 0, world: int = 1) -> float:
    """Mean NME of one validation set; with yaw angles and bbox NME, the mean of the |yaw| bin means
    (the AFLW2000-3D protocol). Under DDP each rank scores every world-th face and the per-bin sums
    and counts are added up, so all ranks agree."""
    part = val.ds if world == 1 else val.ds.subset(range(rank, len(val.ds), world), f"rank{rank}")
    if len(part):
        pred, gt = predict_crops(model, part, device=device, head=val.head)
        # NME is invariant to the crop's similarity transform, so crop space gives the image-space value
        err = nme(pred, gt, normaliser(gt, val.norm, model.spec.scheme))
    else:
        err = np.zeros(0)
    groups = (yaw_bin_masks(part) if val.norm == "bbox" else None) or {"all": np.ones(len(err), bool)}
    sums = [v for m in groups.values() for v in (float(err[m].sum()), float(m.sum()))]
    if world > 1:
        sums = _all_sum(sums, device)
    means = [total / count for total, count in zip(sums[::2], sums[1::2]) if count]
    return float(np.mean(means))


_SELECTS = {"mean": "best.pt by the mean over them", "last": "best.pt: the last epoch"}  # --select beside the set names


def _val_scores(model, vals: list[ValSet], device, rank: int, world: int, select: str) -> tuple[dict, float]:
    """({set name: score}, the score logged beside them: set `select`'s, or the mean over the sets
    (for "mean" and "last", which keeps every epoch as best.pt)."""
    scores = {v.name: _val_score(model, v, device, rank, world) for v in vals}
    return scores, float(np.mean(list(scores.values()))) if select in _SELECTS else scores[select]


def _write_metrics(out: Path, history: list[dict]) -> None:
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


def _head_prefix(conventions, name: str) -> str:
    """State-dict prefix of the head that follows convention `name` (the first head when unknown)."""
    i = list(conventions).index(name) if name in conventions else 0
    return "out." if i == 0 else f"heads.{i - 1}."


def _init_state(ck: dict, model: LandmarkModel) -> dict:
    """The checkpoint's weights with output heads matched to this model's conventions by name; a
    convention the checkpoint lacks starts from its first head. A gate comes from a checkpoint of
    the same conventions, else starts afresh; so does a head layer of another shape or kind (another
    `--head` width or `upsample`). The trunk must fit as it is."""
    if not hasattr(model, "heads"):
        return ck["state_dict"]
    src_spec = json.loads(ck["spec"])
    src_conv = tuple(src_spec.get("conventions") or ())
    sd = {k: v for k, v in ck["state_dict"].items() if not k.startswith(("out.", "heads.", "gate."))}
    gate = ck["state_dict"] if src_conv == model.spec.conventions else {}  # a gate fits its own conventions only
    own = model.state_dict()
    sd.update({k: gate.get(k, v) for k, v in own.items() if k.startswith("gate.")})
    for name in model.spec.conventions or ("",):
        src, dst = _head_prefix(src_conv, name), _head_prefix(model.spec.conventions, name)
        sd.update({dst + k[len(src):]: v for k, v in ck["state_dict"].items() if k.startswith(src)})
    kind = src_spec.get("options", {}).get("upsample", "deconv") != model.spec.build.get("upsample", "deconv")
    afresh = sorted({k.split(".")[0] for k, v in own.items() if k.startswith(HEAD_LAYERS) and (
        k not in sd or sd[k].shape != v.shape or kind and k.startswith(("up1.", "up2.")))})
    sd.update({k: v for k, v in own.items() if k.split(".")[0] in afresh})
    if afresh:
        log.info("%s start afresh (the checkpoint's are of another shape or kind)", ", ".join(afresh))
    return sd


def _load_init_weights(model: LandmarkModel, path: str) -> None:
    """Copy weights from another checkpoint of the same preset (any input size: the presets'
    weights do not depend on it, except simple-cnn's first FC layer, which is then refused)."""
    ck = read_checkpoint(path)
    src = json.loads(ck["spec"]).get("preset")
    if src != model.spec.preset:
        raise UsageError(f"--init {path} holds a {src!r} model, not {model.spec.preset!r}",
                         example=f"flm train --model {src} --init {path}")
    try:
        model.load_state_dict(_init_state(ck, model))
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


def conventions_of(cfg: TrainConfig, sources) -> tuple[str, ...]:
    """The annotation conventions a model trained on `sources` learns, one output head each, in the
    order of `--data` (the first is the model's default output); () for one convention, with
    `heads` off, or for presets without heatmap heads."""
    names = tuple(dict.fromkeys(src.convention for src, _ in sources))
    heatmap = get_preset(cfg.model).spec.output == "heatmap"
    return names if len(names) > 1 and cfg.heads and heatmap else ()


def _describe_sources(sources, init: str | None, teacher: str | None = None) -> str:
    text = "; ".join(f"{ds.name} x{src.weight:g} [{src.convention}, {len(ds)} faces]" for src, ds in sources)
    origin = "; ".join(f"{what} {path}" for what, path in (("from", init), ("taught by", teacher)) if path)
    return f"{text} ({origin})" if origin else text


def _build(cfg: TrainConfig, sources, device) -> tuple[LandmarkModel, tuple[str, ...]]:
    """The model to train (one head per convention; `--init` weights) and its conventions."""
    model = build_model(cfg.model, cfg.img_size, cfg.preset_options())
    conventions = conventions_of(cfg, sources)
    if conventions:
        model = build_model(cfg.model, spec=model.spec.with_(conventions=conventions))
    if cfg.init and not cfg.resume:
        _load_init_weights(model, cfg.init)
    model.spec = model.spec.with_(training_data=_describe_sources(sources, cfg.init, cfg.teacher))
    return model.to(device, memory_format=memory_format(device)), conventions


# What must agree for a teacher's heatmaps to be targets for the model's: maps of the same points, in
# the same conventions, of the same crop normalised alike (its input and heatmap sizes may differ:
# `teacher_maps` resamples).
_TEACHER_SPEC = ("output", "num_points", "scheme", "conventions", "channels", "color_order", "mean", "std")


def _load_teacher(cfg: TrainConfig, model: LandmarkModel, device) -> LandmarkModel | None:
    """The `--teacher` model, frozen in eval mode (None without one); one clear error when its
    heatmaps are not maps of the same points on the same input as the model's."""
    if not cfg.teacher:
        return None
    teacher = load_model(cfg.teacher)
    differ = [f"{k} {getattr(teacher.spec, k)!r} (this model: {getattr(model.spec, k)!r})"
              for k in _TEACHER_SPEC if getattr(teacher.spec, k) != getattr(model.spec, k)]
    if model.spec.output != "heatmap" or differ:
        raise UsageError(f"--teacher {cfg.teacher}: its heatmaps cannot teach this {cfg.model} model: "
                         f"{'; '.join(differ) or 'the model outputs coordinates, not heatmaps'}",
                         example="flm train --init models/flm-68.pt --teacher models/flm-68.pt --upsample light")
    teacher.requires_grad_(False)
    return teacher.to(device, memory_format=memory_format(device))


def teacher_maps(teacher: LandmarkModel, x: torch.Tensor, heads, size) -> torch.Tensor:
    """The teacher's heatmap distributions (N, K, H*W) on the model's heatmap grid `size` (H, W), for
    the model's input batch `x`: a teacher of another input size sees the batch resized to its own
    (the same crops), and its logits are resized to the model's grid (bilinear; both grids' cell
    centres sit at the same fractions of the crop)."""
    side = teacher.spec.input_size
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    logits = teacher(*_inputs(x, heads))
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.softmax(logits.flatten(2), -1)


def _loader(cfg: TrainConfig, spec, sources, conventions, rank: int, world: int):
    """(DataLoader, its EpochSampler, the output head of every training face)."""
    faces = LandmarkDataset("+".join(ds.name for _, ds in sources), spec.scheme,
                            [s for _, ds in sources for s in ds.samples])
    weights = np.concatenate([np.full(len(ds), src.weight) for src, ds in sources])
    head_of_face = torch.tensor([conventions.index(src.convention) if conventions else 0
                                 for src, ds in sources for _ in ds.samples])
    augment = cfg.augment
    if cfg.flip_for or cfg.flip_shift_for:
        per = {src.convention: replace(cfg.augment, flip=cfg.flip_for.get(src.convention, cfg.augment.flip),
                                       flip_shift=cfg.flip_shift_for.get(src.convention, 0.0))
               for src, _ in sources}
        augment = [per[src.convention] for src, ds in sources for _ in ds.samples]
    ds = CropDataset(faces, spec, augment, cfg.seed, point_subset(spec, faces))
    sampler = EpochSampler(len(ds), cfg.seed, rank=rank, world=world, weights=weights)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        worker_init_fn=_ignore_stop_signals,
                        drop_last=len(sampler) > cfg.batch_size, persistent_workers=False)
    return loader, sampler, head_of_face


def _optimiser(cfg: TrainConfig, model, total: int):
    """AdamW with a linear warm-up into a cosine decay over `total` steps; a gate (a linear classifier
    on detached features, see `ShuffleNetHeatmap`) learns at 10x the rate, so that a short fine-tune
    of a trained model is enough for it; the trunk (all but the heatmap head and the gate) at
    `trunk_lr` x the rate, not at all at 0 (its BatchNorm statistics still follow the data)."""
    part = {"head": [], "trunk": [], "gate": []}
    for n, p in model.named_parameters():
        kind = "gate" if n.startswith("gate.") else "trunk" if cfg.trunk_lr != 1 and not n.startswith(HEAD_LAYERS) \
            else "head"
        p.requires_grad_(kind != "trunk" or cfg.trunk_lr > 0)  # a frozen trunk: no gradients to compute
        part[kind].append(p)
    groups = [{"params": part["head"]}] + [{"params": part[k], "lr": cfg.lr * f} for k, f in
                                           (("trunk", cfg.trunk_lr), ("gate", 10)) if part[k] and f > 0]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(200, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


@dataclass
class _Run:
    """One training job in progress: what it trains with, and where it has got to."""

    cfg: TrainConfig
    model: LandmarkModel
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    sched: object
    out: Path
    rank: int
    world: int
    device: torch.device
    steps_per_epoch: int
    epoch: int = 0
    start_step: int = 0
    history: list = field(default_factory=list)
    best: float = float("inf")
    carry: tuple = (0.0, 0)  # loss sum and count of this epoch's steps before a mid-epoch resume
    teacher: LandmarkModel | None = None  # see `_load_teacher`
    t0: float = field(default_factory=time.perf_counter)

    def state(self, epoch: int, step: int, epoch_loss=(0.0, 0)) -> dict:
        """Everything `--resume` needs, beside the weights."""
        return dict(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), epoch=epoch, step=step,
                    history=json.dumps(self.history), best_nme=self.best, torch_rng=torch.get_rng_state(),
                    config=json.dumps(asdict(self.cfg), default=str), world_size=self.world,
                    epoch_loss=[float(v) for v in epoch_loss])

    def save(self, name: str, **extra) -> None:
        if self.rank == 0:
            save_checkpoint(self.out / name, self.model, **extra)


def _resume(run: _Run, path: str) -> None:
    """Load `path` (a last.pt) into `run`: weights, optimiser, schedule, position, history."""
    ck = read_checkpoint(path)
    if "optimizer" not in ck:
        raise UsageError(f"{path}: holds no training state to resume from (a best.pt?); resume from last.pt",
                         example=f"flm train --resume {run.out / 'last.pt'}")
    saved_world = int(ck.get("world_size", 1))
    if int(ck["step"]) and saved_world != run.world:
        raise UsageError(f"{path} stopped mid-epoch in {saved_world} process(es); resume it with as many "
                         f"(this run has {run.world})", example=f"flm train --nproc {saved_world} --resume {path}")
    run.model.load_state_dict(ck["state_dict"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    run.epoch, run.start_step = int(ck["epoch"]), int(ck["step"])
    run.history, run.best = json.loads(ck["history"]), float(ck["best_nme"])
    torch.set_rng_state(ck["torch_rng"])
    if run.start_step and run.rank == 0:  # so the epoch's train_loss is over all its steps, as uninterrupted
        run.carry = tuple(float(v) for v in ck.get("epoch_loss", (0.0, 0)))
    log.info("resumed from %s at epoch %d step %d", path, run.epoch + 1, run.start_step)


def _step_loss(run: _Run, x, target, heads) -> torch.Tensor:
    """The landmark loss of a batch (each face through its convention's head), plus the gate's
    cross-entropy on the faces' conventions for a gated model, plus the KL to a teacher's heatmaps
    (of the same heads) times `teacher_weight`."""
    gated = heads is not None and run.model.spec.gated
    raw, gate = run.net(x, heads, with_gate=True) if gated else (run.net(*_inputs(x, heads)), None)
    loss = landmark_loss(run.model, raw, target, run.cfg)
    if gated:
        loss = loss + F.cross_entropy(gate, heads)
    if run.teacher is not None:
        with torch.no_grad():
            taught = teacher_maps(run.teacher, x, heads, raw.shape[-2:])
        loss = loss + run.cfg.teacher_weight * heatmap_kl(taught, raw)
    return loss


def _inputs(x, heads) -> tuple:
    """A model's forward arguments: the images, and each face's head when there are several."""
    return (x,) if heads is None else (x, heads)


def _train_epoch(run: _Run, loader, head_of_face, conventions, stop, progress) -> tuple[list, int, float, str | None]:
    """One epoch (from `run.start_step`): (losses, steps done, seconds waiting for data, why it stopped early)."""
    cfg, device = run.cfg, run.device
    losses, step, data_s, waiting = [], run.start_step, 0.0, time.perf_counter()
    for x, target, i in loader:
        data_s += time.perf_counter() - waiting  # time this step waited for the loader
        x, target = x.to(device, memory_format=memory_format(device)), target.to(device)
        loss = _step_loss(run, x, target, head_of_face[i].to(device) if conventions else None)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at epoch {run.epoch + 1} step {step + 1}; "
                                f"stopped. {_last_good(run.out)} Try a lower --lr.")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step()
        losses.append(loss.item())
        step += 1
        if progress:
            progress(run.epoch, step, run.steps_per_epoch, losses[-1], None)
        signalled = stop.signum is not None
        if run.world > 1:  # stop on the same step everywhere, or the others wait forever
            signalled = _all_sum([float(signalled)], device)[0] > 0
        if signalled:
            return losses, step, data_s, "signal"
        if cfg.max_steps and run.epoch * run.steps_per_epoch + step >= cfg.max_steps:
            return losses, step, data_s, "max-steps"
        waiting = time.perf_counter()
    return losses, step, data_s, None


def _end_epoch(run: _Run, vals: list[ValSet], step: int, loss: tuple[float, float], data_s: float,
               progress) -> None:
    """Validate after `step` steps of the epoch, record it, and write best.pt / last.pt / metrics.jsonl."""
    global_step = run.epoch * run.steps_per_epoch + step
    if run.world > 1:
        for b in run.model.buffers():  # BatchNorm statistics: rank 0's, as DDP uses them
            dist.broadcast(b, 0)
    scores, val = _val_scores(run.model, vals, run.device, run.rank, run.world, run.cfg.select)
    if not math.isfinite(val):  # NaN/inf weights: never save them as the last good checkpoint
        raise TrainingError(f"validation NME became {val} after epoch {run.epoch + 1} (step {global_step}); "
                            f"stopped without saving these weights. {_last_good(run.out)} Try a lower --lr.")
    rec = {"epoch": run.epoch + 1, "step": global_step,
           "train_loss": loss[0] / loss[1] if loss[1] else None, "val_nme": val, "val": scores,
           "lr": run.sched.get_last_lr()[0], "time_s": round(time.perf_counter() - run.t0, 1),
           "data_wait_s": round(data_s, 3)}
    run.history.append(rec)
    if progress:
        progress(run.epoch, step, run.steps_per_epoch, rec["train_loss"], rec)
    run.epoch, run.start_step = run.epoch + 1, 0
    if val < run.best or run.cfg.select == "last":  # "last": the schedule's end, picked by no set
        run.best = val
        run.save("best.pt", epoch=run.epoch, val_nme=val)
    run.save("last.pt", **run.state(run.epoch, 0))
    if run.rank == 0:
        _write_metrics(run.out, run.history)


def _epochs(run: _Run, loader, sampler, head_of_face, conventions, vals, progress) -> str | None:
    """Train epoch after epoch until the schedule (or `stop_epoch`) ends; returns why it stopped early."""
    cfg = run.cfg
    with _StopFlag() as stop:
        _log_start(run, vals)
        while run.epoch < min(cfg.epochs, cfg.stop_epoch or cfg.epochs):
            run.model.train()
            sampler.epoch, sampler.start = run.epoch, run.start_step * cfg.batch_size
            losses, step, data_s, stopped = _train_epoch(run, loader, head_of_face, conventions, stop, progress)
            loss = (float(np.sum(losses)) + run.carry[0], len(losses) + run.carry[1])
            run.carry = (0.0, 0)
            if run.world > 1:
                loss = tuple(_all_sum([loss[0], float(loss[1])], run.device))
            if stopped == "signal":
                run.save("last.pt", **run.state(run.epoch, step, loss))
                return stopped
            _end_epoch(run, vals, step, loss, data_s, progress)
            if stopped:
                return stopped
        if stop.signum is not None:  # it came during the last epoch's validation and saves
            log.warning("%s arrived after the last step: training is complete, nothing to resume",
                        signal.Signals(stop.signum).name)
            return "signal"  # still a stop: a recipe must not go on to its next stage
    return None


def _check_ranks_agree(run: _Run) -> None:
    """Under DDP every process must end with the same weights: compare their digests, log them."""
    mine = state_digest(run.model.state_dict())
    every = [None] * run.world
    dist.all_gather_object(every, mine)
    if run.rank == 0:
        log.info("final weights sha256 by rank: %s", ", ".join(f"rank{r} {d}" for r, d in enumerate(every)))
    if len(set(every)) > 1:
        raise TrainingError(f"the {run.world} processes ended with different weights ({', '.join(every)}); "
                            f"{_last_good(run.out)}")


def train(cfg: TrainConfig, sources, vals: list[ValSet], progress=None) -> dict:
    """Train on `sources` [(Source, LandmarkDataset)], scoring `vals` every epoch; returns a summary.
    `progress(epoch, step, steps, loss, record)` is called as it goes (record: None mid-epoch, the
    epoch's metrics at its end). One LandmarkDataset each stands for one source / one set."""
    if isinstance(sources, LandmarkDataset):
        sources = [(Source(sources.name), sources)]
    if isinstance(vals, LandmarkDataset):
        vals = [ValSet("val", vals)]
    rank, world, device = join_process_group(pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    model, conventions = _build(cfg, sources, device)
    teacher = _load_teacher(cfg, model, device)
    out = output_folder(cfg.out, "--out")
    if rank == 0:
        sweep_temporaries(out)
    loader, sampler, head_of_face = _loader(cfg, model.spec, sources, conventions, rank, world)
    steps_per_epoch = max(1, len(loader))
    opt, sched = _optimiser(cfg, model, steps_per_epoch * cfg.epochs)
    run = _Run(cfg, model, model, opt, sched, out, rank, world, device, steps_per_epoch, teacher=teacher)
    if cfg.resume:
        _resume(run, cfg.resume)
    if world > 1:  # after resuming: DDP starts every rank from rank 0's weights and averages gradients
        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    stopped = _epochs(run, loader, sampler, head_of_face, conventions, vals, progress)
    if world > 1:
        _check_ranks_agree(run)
        dist.barrier()  # no rank leaves while rank 0 still writes
        dist.destroy_process_group()
    return {"out": str(out), "epochs_done": run.epoch, "best_val_nme": run.best, "history": run.history,
            "stopped": stopped, "wall_s": time.perf_counter() - run.t0}


def _log_start(run: _Run, vals: list[ValSet]) -> None:
    if run.rank == 0:  # logged once a signal is caught, so a signal after this line always saves
        cfg = run.cfg
        log.info("training %s (%s parameters) on %s; validating on %s (%s), %s%s",
                 cfg.model, f"{count_parameters(run.model):,}", run.model.spec.training_data,
                 ", ".join(f"{v.name} ({len(v.ds)} faces, {v.norm})" for v in vals),
                 _SELECTS.get(cfg.select, f"best.pt by {cfg.select}"), run.device,
                 f" x {run.world} processes" if run.world > 1 else "")


def _scored_conventions(cfg: TrainConfig, sources) -> tuple[str, ...]:
    """The conventions whose heads score the validation sets: none for a gated model (its blend
    is scored, as it ships), which needs sources of two or more conventions."""
    conventions = conventions_of(cfg, sources)
    if cfg.gate and not conventions:
        raise UsageError("--gate picks between the heads of several annotation conventions; these sources "
                         f"follow one ({', '.join(dict.fromkeys(src.convention for src, _ in sources))}) or --one-head "
                         "is set", example="flm train --data udacity:A --data ibug-pts:B --gate")
    return () if cfg.gate else conventions


def validation_sets(cfg: TrainConfig, sources, scheme: str):
    """(training sources, validation sets). `--val split` holds out whole people / photos of every
    source that names them (15 %: `LandmarkDataset.split_by_identity`), each scored by the head of
    its own convention (a gated model: by its blend, as it ships); any other `--val FORMAT:PATH` is
    scored whole, by the head of the convention of the same name or else the default output.
    Without `split` the sources train whole."""
    conventions = _scored_conventions(cfg, sources)
    vals, kept = [], sources
    for text in cfg.val:
        if text == "split":
            kept = []
            for src, ds in sources:
                if not ds.has_identities():
                    raise UsageError(f"--data {src.spec!r}: its faces name no person or photo to hold out; "
                                     "give it a validation set of its own", example=f"flm train --data {src.spec} "
                                     "--val FORMAT:PATH")
                tr, va = ds.split_by_identity(cfg.val_fraction, cfg.seed)
                kept.append((src, tr))
                vals.append(ValSet(src.convention, va, va.norm, head_of(conventions, src.convention)))
        else:
            src, ds = open_sources([text], scheme, cfg.skip_bad)[0]
            vals.append(ValSet(src.convention, ds, ds.norm, head_of(conventions, src.convention)))
    names = [v.name for v in vals]
    for k, v in enumerate(vals):  # two sets of one name: number them
        if names.count(v.name) > 1:
            v.name = f"{v.name}#{names[:k + 1].count(v.name)}"
    if cfg.select not in _SELECTS and cfg.select not in [v.name for v in vals]:
        raise UsageError(f"--select {cfg.select!r}: no validation set of that name; "
                         f"known: {', '.join([*_SELECTS, *(v.name for v in vals)])}", example="flm train --select mean")
    return kept, vals


def run(cfg: TrainConfig, progress=None) -> dict:
    """The whole training job of `flm train` and of a recipe stage: open and split the data, report
    the mean-shape baseline per validation set, train, and (rank 0) write the PNG reports."""
    preset = get_preset(cfg.model)
    sources = open_sources(cfg.data, preset.spec.scheme, cfg.skip_bad)
    sources, vals = validation_sets(cfg, sources, preset.spec.scheme)
    everything = LandmarkDataset("train", preset.spec.scheme, [s for _, ds in sources for s in ds.samples])
    baseline = {v.name: mean_shape_baseline(everything, v.ds, preset.spec, v.norm) for v in vals}
    log.info("mean-shape baseline NME: %s", ", ".join(f"{k} {100 * b:.2f} %" for k, b in baseline.items()))
    summary = train(cfg, sources, vals, progress)
    summary["baseline"] = baseline
    if int(os.environ.get("RANK", "0")) == 0:
        write_training_reports(Path(cfg.out), vals[0].ds)
    return summary
