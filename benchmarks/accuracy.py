"""Accuracy of the models flm ships against the peers, on three validation sets, in one run.

    python benchmarks/accuracy.py [--model flm/assets/flm-68.onnx ...] [--json benchmarks/results/accuracy.json] [--markdown]

The sets (../shared/data), each held out exactly as `flm train --val split` holds it out:
  - youtube-faces-68: 15 % of the people (salted SHA-256 of the name, seed 0), inter-ocular NME
    (outer eye corners 36/45);
  - 300w-train: 15 % of the photos (AFW's PHOTO_FACE names keep a photo's faces together; the
    same hash and seed), inter-ocular NME;
  - aflw2000-3d-val: all 198 faces (validation only, never trained on), NME over the landmark
    box sqrt(w*h), per |yaw| bin 0-30 / 30-60 / 60-90 and the mean of the three (the
    AFLW2000-3D protocol).
Every system is measured on the same faces in the same run, with median NME, failure rate and
AUC of the CED curve at 8 % and 10 %. Variants:
  - gt-box (all sets): each system gets the tight box of the ground-truth landmarks and cuts its
    crop by its own published convention (PFLD, Peppa: ../shared/peers/README.md; dlib: the box as
    its rectangle; flm: its spec's crop rule via `FaceLandmarker.detect(image, boxes=...)` with the
    runtime's default refinement for an app's box);
  - detector (youtube-faces-68 and 300w-train): each system starts from a face detector (the same
    OpenCV Haar detector, with flm's runtime settings, for flm, PFLD and Peppa; dlib's own HOG
    detector for dlib); the detection whose box best overlaps the true face is used - flm's by its
    `detection_box`, like the peers' - and a missed face counts as a failure (its NME is not in
    the mean).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flm.geometry import IBUG68_REGIONS, YAW_BINS, landmark_box, nme_summary, normaliser, yaw_bins  # noqa: E402
from flm.pipeline.data import open_dataset  # noqa: E402  (torch-free)
from flm.runtime.shipped import shipped_models  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# name -> (FORMAT:PATH, how its validation part is chosen, NME normaliser, detector variant?)
SETS = {
    "youtube-faces-68": (f"udacity:{SHARED / 'youtube-faces-68'}", "split", "inter-ocular", True),
    "300w-train": (f"ibug-pts:{SHARED / '300w-train'}", "split", "inter-ocular", True),
    "aflw2000-3d-val": (f"aflw2000:{SHARED / 'aflw2000-3d-val'}", "all", "bbox", False),
}

PEERS = ROOT.parent / "shared" / "peers"
DLIB_DAT = Path("/usr/share/dlib/shape_predictor_68_face_landmarks.dat")


def _session(path):
    from speed import repaired  # benchmarks/speed.py: flushes the peers' denormal weights (same outputs, ~100x faster)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # PFLD's file lists its initializers as inputs: silence that warning
    so.intra_op_num_threads = 2
    model, _ = repaired(Path(path))
    return ort.InferenceSession(model or str(path), so, providers=["CPUExecutionProvider"])


def _corner_crop(img, x0, y0, w, h, size):
    """Crop [x0, x0+w) x [y0, y0+h) (corner coordinates, as the peers' scripts slice) resized to size,
    zero outside the image."""
    sx, sy = size[0] / w, size[1] / h
    m = np.array([[sx, 0, -x0 * sx + 0.5 * sx - 0.5], [0, sy, -y0 * sy + 0.5 * sy - 0.5]])
    return cv2.warpAffine(img, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class PFLD:
    name = "PFLD (cunjian, 0.73 M params)"
    file = "pfld-68-cunjian.onnx"

    def __init__(self):
        self.sess = _session(PEERS / self.file)

    def __call__(self, rgb, box):
        x0, y0, x1, y1 = box
        side = 1.1 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bx, by = cx - side / 2, cy - side / 2
        crop = _corner_crop(rgb, bx, by, side, side, (112, 112))
        x = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        f = self.sess.run(None, {"input": x})[0].reshape(-1, 2)
        return np.stack([bx + f[:, 0] * side, by + f[:, 1] * side], 1)


class Peppa:
    name = "Peppa slim160 (1.0 MB)"
    file = "peppa-slim160-68.onnx"

    def __init__(self):
        self.sess = _session(PEERS / self.file)

    def __call__(self, rgb, box):
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        bx, by, bw, bh = x0 - 0.2 * w, y0 - 0.2 * h, 1.4 * w, 1.4 * h
        crop = _corner_crop(rgb[:, :, ::-1].copy(), bx, by, bw, bh, (160, 160))  # BGR
        x = ((crop.astype(np.float32) - 127.0) / 127.0).transpose(2, 0, 1)[None]
        f = self.sess.run(None, {"input1": x})[0][0, :136].reshape(-1, 2)
        return np.stack([bx + f[:, 0] * bw, by + f[:, 1] * bh], 1)


class Dlib:
    name = "dlib 68 (99.7 MB)"

    def __init__(self):
        import dlib
        self.dlib = dlib
        self.predictor = dlib.shape_predictor(str(DLIB_DAT))
        self.detector = dlib.get_frontal_face_detector()

    def __call__(self, rgb, box):
        r = self.dlib.rectangle(*[int(round(v)) for v in box])
        s = self.predictor(rgb, r)
        return np.array([[p.x, p.y] for p in s.parts()], np.float64)

    def detect(self, rgb):
        return [np.array([d.left(), d.top(), d.right(), d.bottom()], float) for d in self.detector(rgb, 1)]


class Flm:
    def __init__(self, model_path):
        from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
        self.name = f"flm ({Path(model_path).name})"
        self.lm = FaceLandmarker.create(str(model_path), FaceLandmarkerOptions(threads=2))

    def __call__(self, rgb, box):
        return self.lm.detect(rgb[:, :, ::-1], boxes=[box]).faces[0].landmarks

    def detect_and_predict(self, rgb):
        return [(f.detection_box, f.landmarks) for f in self.lm.detect(rgb[:, :, ::-1]).faces]


HAAR = None


def haar_boxes(rgb):
    """Raw boxes of flm's own Haar detector (same settings as flm's runtime), for the peers."""
    global HAAR
    if HAAR is None:
        from flm.runtime import HaarDetector
        HAAR = HaarDetector()
    boxes, _ = HAAR.detect(rgb)
    return list(boxes)


def iou(a, b) -> float:
    from flm.runtime import box_iou  # the runtime's own IoU, so matching follows the same rule
    return float(box_iou(a, b)[0, 0])


def predict(sys_, s, variant):
    """(landmarks, or None for a missed face) of one system on one sample."""
    rgb = s.load()
    box = landmark_box(s.points)
    if variant == "gt-box":
        return sys_(rgb, box)
    if hasattr(sys_, "detect_and_predict"):
        cands = sys_.detect_and_predict(rgb)
    else:
        boxes = sys_.detect(rgb) if hasattr(sys_, "detect") else haar_boxes(rgb)
        cands = [(b, None) for b in boxes]
    best = max(cands, key=lambda c: iou(c[0], box), default=None)
    if best is None or iou(best[0], box) < 0.2:
        return None
    return best[1] if best[1] is not None else sys_(rgb, best[0])


def run(systems, ds, variant, norm):
    results = {}
    bins = yaw_bins([s.meta["yaw"] for s in ds.samples]) if norm == "bbox" else None
    for sys_ in systems:
        point_errs, t0 = np.full((len(ds), 68), np.nan), time.perf_counter()
        for j, s in enumerate(ds.samples):
            pred = predict(sys_, s, variant)
            if pred is not None:
                gt = s.points.astype(np.float64)
                point_errs[j] = np.linalg.norm(np.asarray(pred) - gt, axis=-1) / normaliser(gt[None], norm, "ibug68")
        errs = point_errs.mean(axis=1)
        found = ~np.isnan(errs)
        summ = nme_summary(errs[found])
        summ["regions"] = {k: float(point_errs[found][:, list(idx)].mean()) for k, idx in IBUG68_REGIONS.items()}
        summ["missed"] = int((~found).sum())
        for key in ("failure_rate", "failure_rate_10"):  # a missed face is a failure
            summ[key] = (summ[key] * found.sum() + summ["missed"]) / len(ds)
        if bins is not None:
            summ["yaw_bins"] = {k: float(np.nanmean(errs[m])) if m.any() else None for k, m in bins.items()}
            summ["yaw_counts"] = {k: int(m.sum()) for k, m in bins.items()}
            summ["yaw_balanced_nme"] = float(np.mean([v for v in summ["yaw_bins"].values() if v is not None]))
        summ["seconds"] = round(time.perf_counter() - t0, 1)
        results[sys_.name] = summ
        print(f"  {variant:8s} {sys_.name:32s} NME {100 * summ['nme_mean']:.2f} %  ({summ['seconds']} s)",
              file=sys.stderr)
    return results


def validation_part(spec: str, how: str, val_fraction: float, seed: int):
    ds = open_dataset(spec)
    return ds.split_by_identity(val_fraction, seed)[1] if how == "split" else ds


def systems_for(models: list[str]):
    systems = [Flm(m) for m in models if Path(m).exists()]
    for m in models:
        if not Path(m).exists():
            print(f"warning: {m} not found; not measured", file=sys.stderr)
    systems += [cls() for cls in (PFLD, Peppa) if (PEERS / cls.file).exists()]
    try:
        if DLIB_DAT.exists():
            systems.append(Dlib())
        else:
            print("dlib: skipped (apt-get install libdlib-data)", file=sys.stderr)
    except ImportError:
        print("dlib: skipped (pip install dlib-bin)", file=sys.stderr)
    return systems


def table_rows(entry: dict, res: dict) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of one set and variant, best first (yaw-balanced NME for AFLW, else mean NME)."""
    cols = ["system", "NME mean", "median", "FR 8%", "AUC 8%", "FR 10%", "AUC 10%", "missed"]
    if entry["norm"] == "bbox":
        cols[2:2] = [f"yaw {k}" for k in YAW_BINS] + ["yaw-balanced"]
    key = "yaw_balanced_nme" if entry["norm"] == "bbox" else "nme_mean"
    rows = []
    for sys_name, r in sorted(res.items(), key=lambda kv: kv[1][key]):
        row = [sys_name, f"{100 * r['nme_mean']:.2f} %", f"{100 * r['nme_median']:.2f} %",
               f"{100 * r['failure_rate']:.1f} %", f"{r['auc']:.3f}", f"{100 * r['failure_rate_10']:.1f} %",
               f"{r['auc_10']:.3f}", str(r["missed"])]
        if entry["norm"] == "bbox":
            row[2:2] = [f"{100 * v:.2f} %" for v in r["yaw_bins"].values()] + [f"{100 * r[key]:.2f} %"]
        rows.append(row)
    return cols, rows


def region_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): each system's NME by face region (the 68-point scheme's jaw, brows, nose, eyes,
    mouth) and over all points, a row per system in `res`'s order."""
    cols = ["system", *IBUG68_REGIONS, "all"]
    return cols, [[name, *(f"{100 * v:.2f} %" for v in r["regions"].values()), f"{100 * r['nme_mean']:.2f} %"]
                  for name, r in res.items()]


def print_tables(report: dict, markdown: bool = False) -> None:
    for name, entry in report["sets"].items():
        for variant, res in entry["variants"].items():
            title = f"{name}, {variant}: {entry['faces']} faces ({entry['held_out']}), NME {entry['norm']}"
            cols, rows = table_rows(entry, res)
            print_table(title, cols, rows, markdown)
            if variant == "gt-box":
                order = [row[0] for row in rows]
                cols, rows = region_rows({k: res[k] for k in order})
                print_table(f"{name}, {variant}, by face region: NME {entry['norm']}", cols, rows, markdown)


def print_table(title: str, cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if c == "system" else "right")
    for row in rows:
        t.add_row(*row)
    Console(width=200).print(t)
    if markdown:
        print(f"\n{title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="flm ONNX file (repeatable; default: every model flm ships)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="gt-box,detector")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/accuracy.json"))
    ap.add_argument("--markdown", action="store_true", help="Also print the tables as Markdown (for the README).")
    args = ap.parse_args(argv)

    systems = systems_for(args.model or [str(m.path) for m in shipped_models()])
    report = {"sets": {}}
    for name in args.sets.split(","):
        spec, how, norm, detector = SETS[name]
        ds = validation_part(spec, how, args.val_fraction, args.seed)
        held = (f"{len({s.identity for s in ds.samples})} held-out {'people' if 'udacity' in spec else 'photos'}"
                if how == "split" else "validation split, never trained on")
        print(f"{name}: {len(ds)} faces, {held}", file=sys.stderr)
        entry = {"data": spec, "faces": len(ds), "held_out": held, "norm": norm, "variants": {}}
        for variant in args.variants.split(","):
            if variant == "detector" and not detector:
                continue
            entry["variants"][variant] = run(systems, ds, variant, norm)
        report["sets"][name] = entry
    print_tables(report, args.markdown)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
