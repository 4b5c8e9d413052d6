"""Reports: PNGs written next to a training run (loss / NME curves and a prediction grid), and an
evaluation's JSON and CED plot (`flm evaluate --json/--ced`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np

from flm.fileio import atomic_path, log_written
from flm.geometry import REGION_COLORS_BGR, ced_curve, point_regions
from flm.pipeline.augment import make_crop
from flm.pipeline.data import LandmarkDataset
from flm.pipeline.evaluate import point_subset, predict_crops

log = logging.getLogger("flm")


def write_training_reports(out: Path, val_ds: LandmarkDataset, n_grid: int = 16) -> None:
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if history:
            plot_curves(history, out / "curves.png")
    if (out / "best.pt").is_file():
        from flm.pipeline.checkpoint import load_model
        prediction_grid(load_model(out / "best.pt"), val_ds, out / "predictions.png", n_grid)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], marker="o")
    a.set_title("training loss")
    names = list(history[-1].get("val") or {})
    for k, name in enumerate(names):
        b.plot(ep, [100 * h["val"][name] if name in h.get("val", {}) else np.nan for h in history],
               marker="o", color=f"C{k + 1}", label=name)
    if len(names) != 1:
        b.plot(ep, [100 * h["val_nme"] for h in history], marker=".", color="k", label="selects best.pt")
    b.legend(fontsize=7)
    b.set_title("validation NME %")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def write_report(result: dict, json_path=None, ced_png=None) -> None:
    """An evaluation result (`flm.pipeline.evaluate.evaluate`) as JSON, and/or its CED curve as PNG."""
    if json_path:
        t = time.perf_counter()
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))
        log_written(json_path, t)
    if ced_png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs, ys = ced_curve(np.asarray(result["errors"]), result["threshold"])
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(xs * 100, ys, label=f"{result['model']} (AUC {result['auc']:.3f})")
        ax.set_xlabel(f"NME ({result['norm']}) %")
        ax.set_ylabel("fraction of images")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, ced_png)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG atomically, log it, and free it."""
    import matplotlib.pyplot as plt
    t = time.perf_counter()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    log_written(path, t)


def prediction_grid(model, ds: LandmarkDataset, path: Path, n: int = 16) -> None:
    """Validation crops with ground truth (white) and predictions (coloured by face region)."""
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    sub = ds.subset(idx, "grid")
    pred, gt = predict_crops(model, sub)
    pidx = point_subset(model.spec, ds)
    regions = point_regions(model.spec.num_points)
    tiles, scale = [], 2
    for j, s in enumerate(sub.samples):
        pts = s.points if pidx is None else s.points[pidx]
        crop, _ = make_crop(s.load(), pts, model.spec, None, None)
        tile = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), None, fx=scale, fy=scale)
        for (gx, gy), (px, py), r in zip(gt[j], pred[j], regions):
            cv2.circle(tile, (int(gx * scale), int(gy * scale)), 2, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(tile, (int(px * scale), int(py * scale)), 2, REGION_COLORS_BGR[r], -1, cv2.LINE_AA)
        tiles.append(tile)
    cols = 4
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    t = time.perf_counter()
    with atomic_path(path, suffix=".png") as tmp:
        ok, buf = cv2.imencode(".png", grid)
        tmp.write_bytes(buf.tobytes())
    log_written(path, t)
