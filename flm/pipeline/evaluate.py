"""Prediction and evaluation on a landmark dataset (the training-time twin of the runtime).

Crops are cut with the same `flm.geometry` functions the runtime uses; predictions are mapped
back to image pixels, so NME is measured exactly where a user would see the points.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flm.errors import UsageError
from flm.fileio import output_file
from flm.geometry import (crop_matrix, invert_affine, landmark_box, nme, nme_summary, normaliser,
                          swap_channels, to_model_input, transform_points, warp, yaw_bins)
from flm.pipeline.augment import AugmentConfig, make_crop
from flm.pipeline.data import LandmarkDataset, Source, drop_undecodable, open_dataset
from flm.pipeline.models import memory_format
from flm.spec import ModelSpec, scheme_index

log = logging.getLogger("flm")


class CropDataset(Dataset):
    """Model inputs and crop-space targets for a LandmarkDataset.

    Items are addressed as (index, epoch) so augmentation is a pure function of the seed,
    the epoch and the sample — the same in any worker, and the same after `--resume`.
    """

    def __init__(self, ds: LandmarkDataset, spec: ModelSpec, aug: AugmentConfig | list | None = None,
                 seed: int = 0, point_index=None):
        """`aug`: one augmentation for every face, or a list with one per face (e.g. flips for the
        sources whose labels are mirror-consistent only)."""
        self.ds, self.spec, self.aug, self.seed = ds, spec, aug, seed
        self.point_index = point_index  # e.g. the 12 eye points of a 68-point set

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        s = self.ds.samples[i]
        img = s.load()
        pts = s.points if self.point_index is None else s.points[self.point_index]
        aug = self.aug[i] if isinstance(self.aug, list) else self.aug
        rng = np.random.default_rng([self.seed, epoch, i]) if aug else None
        crop, cpts = make_crop(img, pts, self.spec, rng, aug)
        x = to_model_input(swap_channels(crop, self.spec.color_order), self.spec.channels, self.spec.mean, self.spec.std)
        return torch.from_numpy(x), torch.from_numpy(cpts), i


def point_subset(spec: ModelSpec, ds: LandmarkDataset):
    """Indices of the model's points inside the dataset's scheme (eyes12 from ibug68), or None."""
    idx = scheme_index(ds.scheme, spec.scheme)
    return None if idx is None else np.asarray(idx)


def head_of(conventions: tuple[str, ...], convention: str | None) -> int | None:
    """Index of the output head that follows `convention`; None (the model's default output: its
    only head, or a gated model's blend) for a model of one convention and for conventions it did
    not learn."""
    return conventions.index(convention) if len(conventions) > 1 and convention in conventions else None


@torch.no_grad()
def predict_crops(model, ds: LandmarkDataset, batch_size: int = 64, device="cpu", workers: int = 0,
                  head: int | None = None):
    """(predictions, ground truth) as (N, K, 2) in model-input pixels of the evaluation crop, from
    output head `head` (see `head_of`) or the model's default output."""
    spec = model.spec
    loader = DataLoader(CropDataset(ds, spec, None, point_index=point_subset(spec, ds)),
                        batch_size=batch_size, num_workers=workers)
    device = torch.device(device)
    layout = memory_format(device)
    model.to(memory_format=layout).eval()
    preds, gts = [], []
    for x, pts, _ in loader:
        x = x.to(device, memory_format=layout)
        raw = model(x) if head is None else model(x, torch.full((len(x),), head, device=device))
        preds.append(model.decode(raw).float().cpu().numpy())
        gts.append(pts.numpy())
    return np.concatenate(preds), np.concatenate(gts)


def yaw_bin_masks(ds: LandmarkDataset) -> dict[str, np.ndarray] | None:
    """|yaw| bins of the AFLW2000-3D protocol (`flm.geometry.YAW_BINS`), or None when some face has no yaw."""
    yaws = [s.meta.get("yaw") for s in ds.samples]
    if not yaws or any(y is None for y in yaws):
        return None
    return yaw_bins(np.asarray(yaws, np.float64))


def to_image_coords(crop_points: np.ndarray, ds: LandmarkDataset, spec: ModelSpec, point_index=None):
    """Map crop-space points back to each sample's image pixels."""
    out = np.empty_like(crop_points, dtype=np.float64)
    for j, s in enumerate(ds.samples):
        pts = s.points if point_index is None else s.points[point_index]
        m = crop_matrix(landmark_box(pts), spec.crop, spec.input_size)
        out[j] = transform_points(crop_points[j], invert_affine(m))
    return out


def evaluate(model, ds: LandmarkDataset, norm: str = "inter-ocular", threshold: float = 0.08,
             batch_size: int = 64, device="cpu", head: int | None = None) -> dict:
    """NME summary on `ds`, crops from the ground-truth landmark box (the challenge protocol)."""
    spec = model.spec
    idx = point_subset(spec, ds)
    pred_c, _ = predict_crops(model, ds, batch_size, device, head=head)
    pred = to_image_coords(pred_c, ds, spec, idx)
    gt = np.stack([s.points if idx is None else s.points[idx] for s in ds.samples]).astype(np.float64)
    errors = nme(pred, gt, normaliser(gt, norm, spec.scheme))
    result = {"dataset": ds.name, "model": spec.preset, "norm": norm, **nme_summary(errors, threshold)}
    bins = yaw_bin_masks(ds)
    if norm == "bbox" and bins is not None:
        # AFLW2000-3D protocol: mean NME per |yaw| bin, and the mean of the three means
        result["yaw_bins"] = {k: float(errors[m].mean()) if m.any() else None for k, m in bins.items()}
        means = [v for v in result["yaw_bins"].values() if v is not None]
        result["yaw_balanced_nme"] = float(np.mean(means)) if means else None
    result["errors"] = errors.tolist()
    return result


def mean_shape_baseline(train: LandmarkDataset, val: LandmarkDataset, spec: ModelSpec,
                        norm: str = "inter-ocular") -> float:
    """NME of predicting the mean training shape in every crop: the bar a model must clear."""
    idx = point_subset(spec, train)
    def crop_pts(ds):
        out = []
        for s in ds.samples:
            p = s.points if idx is None else s.points[idx]
            out.append(transform_points(p, crop_matrix(landmark_box(p), spec.crop, spec.input_size)))
        return np.stack(out)
    mean = crop_pts(train).mean(axis=0)
    gt = crop_pts(val)
    return float(nme(np.broadcast_to(mean, gt.shape), gt, normaliser(gt, norm, spec.scheme)).mean())


def check_val_fraction(value, example: str) -> None:
    """UsageError unless --val-fraction, the share of people / photos the identity split holds
    out (`flm train` and `flm evaluate --split`), is a number between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UsageError(f"--val-fraction is the share of people held out, between 0 and 1, got {value!r}",
                         example=example)


def check_evaluation_options(norm: str, split: str, threshold: float, val_fraction: float,
                             json_out=None, ced=None) -> None:
    if norm not in ("auto", "inter-ocular", "inter-pupil", "bbox"):
        raise UsageError(f"unknown --norm {norm!r}", example="flm evaluate best.pt --data udacity:DIR --norm inter-ocular")
    if split not in ("all", "val", "train"):
        raise UsageError(f"unknown --split {split!r}", example="flm evaluate best.pt --data udacity:DIR --split val")
    if not 0 < threshold < 1:
        raise UsageError(f"--threshold is an NME fraction between 0 and 1 (0.08 = 8 %), got {threshold}",
                         example="flm evaluate best.pt --data udacity:DIR --threshold 0.08")
    check_val_fraction(val_fraction, "flm evaluate best.pt --data udacity:DIR --split val --val-fraction 0.15")
    for option, path in (("--json", json_out), ("--ced", ced)):
        if path is not None:
            output_file(path, option)
    if ced is not None and Path(ced).suffix.lower() != ".png":
        raise UsageError(f"--ced {ced}: the CED curve is written as PNG; expected a .png name",
                         example="flm evaluate best.pt --data udacity:DIR --ced ced.png")


def evaluate_sets(model, data: list[str], *, norm: str = "auto", threshold: float = 0.08, convention: str = "auto",
                  skip_bad: bool = False, split: str = "all", val_fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """`evaluate` on every `FORMAT:PATH` of `data` (`flm evaluate`): each set by its own NME protocol
    unless `norm` says otherwise, through the head of the convention named like its folder (or
    `convention`), on all its faces or on one side of `flm train`'s identity split."""
    check_evaluation_options(norm, split, threshold, val_fraction)
    conventions = model.spec.conventions
    if convention not in ("auto", *conventions):
        raise UsageError(f"--convention {convention!r}: this model learnt {', '.join(conventions) or 'one convention'}",
                         example="flm evaluate best.pt --data FORMAT:PATH --convention auto")
    results = []
    for text in data:
        ds = drop_undecodable(open_dataset(text, skip_bad=skip_bad), skip_bad).mapped(model.spec.scheme)
        if split != "all":
            if not ds.has_identities():
                raise UsageError(f"--split {split}: {text} names no people or photos to split by (only sets "
                                 f"flm train splits do); score all of it", example=f"flm evaluate best.pt --data {text} --split all")
            ds = ds.split_by_identity(val_fraction, seed)[split == "val"]
        gated = convention == "auto" and model.spec.gated  # auto: what the gated model answers
        head = None if gated else head_of(conventions, Source.parse(text).convention if convention == "auto" else convention)
        result = evaluate(model, ds, norm=ds.norm if norm == "auto" else norm, threshold=threshold, head=head)
        result["convention"] = "gate" if gated else (conventions or ("",))[head or 0]
        results.append(result)
    return results
