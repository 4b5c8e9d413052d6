"""The runtime's detector box corrections and refinement defaults, refitted and measured in one run.

    python benchmarks/defaults.py [--model flm/assets/NAME.onnx] [--limit N] [--fit-limit N]
                                  [--json benchmarks/results/defaults.json]

1. Fit (training faces only). Each detector's `BoxAdjust` (flm/runtime/detectors.py: the median
   shift and scale from its box to the tight landmark box, `calibrate_box_adjust`) is refitted on
   the *training* part of youtube-faces-68 and of 300w-train, split exactly as `flm train --val
   split` splits them (`split_by_identity(0.15, 0)[0]`). `--fit-limit` faces per set (default
   400), every k-th face so the whole set is spanned, are padded by `--pad` (30 %) with gray so the
   detector's box is not cut by the image border, and each ground-truth landmark box is matched to
   the detection with the highest IoU (> 0.2). Held-out people/photos and aflw2000-3d-val are never
   used for fitting.
2. Measure (validation faces only). Mean NME for refine 0 / 1 / 2 from three box sources:
   the caller's box (`detect(image, boxes=[tight box of the ground-truth landmarks])`), Haar and
   YuNet (each with the refitted correction), on youtube-faces-68's held-out people and
   300w-train's held-out photos (`split_by_identity(0.15, 0)[1]`, inter-ocular NME, outer eye
   corners) and all 198 faces of aflw2000-3d-val (NME over the landmark box sqrt(w*h)), images as
   they are (unpadded). Detectors run inside `FaceLandmarker.detect(image)` with the runtime's
   default options (minimum face size, max_faces, NMS); a detector's face is the one whose
   `detection_box` overlaps the ground-truth landmark box best (IoU > 0.2, as in
   benchmarks/accuracy.py); a face it misses is counted ("missed") and left out of that row's
   mean. Each image is searched once per detector: the found face's detection box, mapped by the
   detector's own `landmark_boxes`, goes through `detect(image, boxes=...)` — the passes
   `detect(image)` runs after its detector — with refine 0, 1 and 2 (refine 0 is checked, on every
   face, to equal what `detect(image)` returned).
3. Choose. Each source's default is the refine with the lowest mean over the three sets' NMEs; a
   tie at the printed precision (0.01 %) goes to fewer passes (each pass is one more model run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flm.fileio import atomic_path  # noqa: E402
from flm.geometry import landmark_box, nme, normaliser  # noqa: E402
from flm.pipeline.data import open_dataset  # noqa: E402  (torch-free)
from flm.runtime.shipped import resolve_model  # noqa: E402
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions  # noqa: E402
from flm.runtime.detectors import BoxAdjust, HaarDetector, YuNetDetector, box_iou, calibrate_box_adjust  # noqa: E402

SHARED = ROOT.parent / "shared"
FIT_SETS = {  # name -> FORMAT:PATH; the training part (split_by_identity(...)[0]) is used
    "youtube-faces-68": f"udacity:{SHARED / 'data' / 'youtube-faces-68'}",
    "300w-train": f"ibug-pts:{SHARED / 'data' / '300w-train'}",
}
VAL_SETS = {  # name -> (FORMAT:PATH, "split": held-out part of split_by_identity / "all", NME normaliser)
    "youtube-faces-68": (FIT_SETS["youtube-faces-68"], "split", "inter-ocular"),
    "300w-train": (FIT_SETS["300w-train"], "split", "inter-ocular"),
    "aflw2000-3d-val": (f"aflw2000:{SHARED / 'data' / 'aflw2000-3d-val'}", "all", "bbox"),
}
REFINES = (0, 1, 2)
MIN_IOU = 0.2


# --------------------------------------------------------------------------- fitting (pure)


def best_match(det_boxes, gt_box, min_iou: float = MIN_IOU) -> int | None:
    """Index of the detection overlapping `gt_box` most, or None when none reaches `min_iou`."""
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    if len(det_boxes) == 0:
        return None
    ious = box_iou(gt_box, det_boxes)[0]
    i = int(np.argmax(ious))
    return i if ious[i] > min_iou else None


def fit_box_adjust(detections, gt_boxes, min_iou: float = MIN_IOU) -> dict:
    """Fit a `BoxAdjust` from per-image detections and each image's ground-truth landmark box.

    detections: one (M_i, 4) array of detector boxes per face (M_i may be 0: a miss);
    gt_boxes: (N, 4) tight boxes of each face's landmarks. Each face's best-overlapping detection
    (IoU > `min_iou`) is paired with its box and `calibrate_box_adjust` takes the medians.
    Returns {"adjust", "matched", "faces", "iou_raw", "iou_adjusted"} (median IoUs with the
    landmark box before / after the correction).
    """
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if len(detections) != len(gt_boxes):
        raise ValueError(f"fit_box_adjust: {len(detections)} detection lists for {len(gt_boxes)} faces")
    pairs = [(np.asarray(d, np.float64).reshape(-1, 4)[i], g) for d, g in zip(detections, gt_boxes)
             if (i := best_match(d, g, min_iou)) is not None]
    if not pairs:
        raise ValueError(f"fit_box_adjust: no detection overlaps any of the {len(gt_boxes)} faces (IoU > {min_iou})")
    det = np.stack([p[0] for p in pairs])
    gt = np.stack([p[1] for p in pairs])
    adjust = calibrate_box_adjust(det, gt)
    iou = lambda a: float(np.median([box_iou(x, y)[0, 0] for x, y in zip(a, gt)]))
    return {"adjust": adjust, "matched": len(pairs), "faces": len(gt_boxes),
            "iou_raw": iou(det), "iou_adjusted": iou(adjust.apply(det))}


# --------------------------------------------------------------------------- data


def every_kth(samples: list, limit: int | None) -> list:
    """At most `limit` samples, evenly spread over the list (all when limit is None or larger)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]


def part(spec: str, which: str, val_fraction: float, seed: int):
    """'train' / 'val' part of `flm train --val split`'s split, or 'all'."""
    ds = open_dataset(spec)
    if which == "all":
        return ds
    tr, va = ds.split_by_identity(val_fraction, seed)
    return tr if which == "train" else va


def detect_padded(detector, rgb: np.ndarray, pad: float) -> np.ndarray:
    """Raw detector boxes (image coordinates) on the image padded by `pad` of its size with gray."""
    h, w = rgb.shape[:2]
    py, px = int(round(pad * h)), int(round(pad * w))
    big = cv2.copyMakeBorder(rgb, py, py, px, px, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    boxes, _ = detector.detect(big)
    return boxes - np.array([px, py, px, py], np.float64)


# --------------------------------------------------------------------------- steps


def refit(detectors: dict, args) -> dict:
    """Step 1: {detector name: fit result} on training faces of FIT_SETS (plus each set's own fit)."""
    out = {}
    faces = {}
    for name, spec in FIT_SETS.items():
        samples = every_kth(part(spec, "train", args.val_fraction, args.seed).samples, args.fit_limit)
        faces[name] = samples
    for det_name, det in detectors.items():
        t0 = time.perf_counter()
        dets, gts, per_set = [], [], {}
        for set_name, samples in faces.items():
            d = [detect_padded(det, s.load(), args.pad) for s in samples]
            g = np.stack([landmark_box(s.points) for s in samples])
            per_set[set_name] = fit_box_adjust(d, g)
            dets += d
            gts.append(g)
        res = fit_box_adjust(dets, np.concatenate(gts))
        res["per_set"] = per_set
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[det_name] = res
        log(f"fit {det_name}: {res['matched']} of {res['faces']} training faces matched, {res['adjust']} "
            f"({res['seconds']} s)")
    return out


def face_error(points, s, norm: str) -> float:
    gt = s.points.astype(np.float64)[None]
    return float(nme(np.asarray(points, np.float64)[None], gt, normaliser(gt, norm, "ibug68"))[0])


def runtime_detector(lm, spec: str, adjust: BoxAdjust | None = None):
    """The detector that `FaceLandmarkerOptions(detector=spec)` builds (the runtime's default minimum size,
    score threshold and NMS), with `adjust` in place of its class's box correction (None: keep the class's)."""
    d = FaceLandmarker.create(lm.session, FaceLandmarkerOptions(detector=spec)).detector
    common = dict(min_size=d.min_size, score_threshold=d.score_threshold, nms_iou=d.nms_iou, adjust=adjust)
    if isinstance(d, YuNetDetector):
        return YuNetDetector(d.path, **common)
    if isinstance(d, HaarDetector):
        return HaarDetector(**common)
    raise ValueError(f"no box correction to fit for detector {spec!r}")


def measure(landmarkers: dict, detectors: dict, args) -> dict:
    """Step 2: {set: {source: {"nme": {refine: mean}, "measured", "missed"}}} on validation faces.

    landmarkers: {refine: FaceLandmarker} for the boxes path; detectors: {name: FaceDetector}.
    """
    report = {}
    lm0 = landmarkers[0]
    rule = lm0.crop_rule
    # the detection step is the runtime's own (its minimum face size rule, max_faces, NMS), on the same session
    finders = {name: FaceLandmarker.create(lm0.session, FaceLandmarkerOptions(detector=det, refine=0))
               for name, det in detectors.items()}
    for set_name, (spec, which, norm) in VAL_SETS.items():
        samples = every_kth(part(spec, "val" if which == "split" else "all", args.val_fraction, args.seed).samples,
                            args.limit)
        sources = ["caller-box", *detectors]
        errs = {src: {k: [] for k in REFINES} for src in sources}
        missed = dict.fromkeys(sources, 0)
        t0 = time.perf_counter()
        for s in samples:
            rgb = s.load()
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            gt_box = landmark_box(s.points)
            start, found = {"caller-box": gt_box}, {}
            for name, finder in finders.items():
                faces = finder.detect(bgr).faces
                i = best_match([f.detection_box for f in faces], gt_box)
                if i is None:
                    missed[name] += 1
                    continue
                found[name] = faces[i].landmarks
                start[name] = detectors[name].landmark_boxes(faces[i].detection_box[None], rgb.shape, rule)[0]
            for src, box in start.items():
                for k in REFINES:
                    pts = landmarkers[k].detect(bgr, boxes=[box]).faces[0].landmarks
                    if k == 0 and src in found and not np.allclose(pts, found[src], atol=1e-6):
                        raise RuntimeError(f"{src}: detect(image, boxes=landmark_boxes(detection)) no longer gives "
                                           "what detect(image) gives; these numbers would not be what users get")
                    errs[src][k].append(face_error(pts, s, norm))
        report[set_name] = {
            "data": _shown(spec), "part": "held-out (split_by_identity(%g, %d)[1])" % (args.val_fraction, args.seed)
            if which == "split" else "all", "norm": norm, "faces": len(samples),
            "sources": {src: {"nme": {str(k): float(np.mean(errs[src][k])) if errs[src][k] else None for k in REFINES},
                              "measured": len(errs[src][0]), "missed": missed[src]} for src in sources},
            "seconds": round(time.perf_counter() - t0, 1)}
        log(f"measured {set_name}: {len(samples)} faces, missed " +
            ", ".join(f"{d} {missed[d]}" for d in detectors) + f" ({report[set_name]['seconds']} s)")
    return report


def choose(table: dict) -> dict:
    """Step 3: {source: {"means": {refine: mean over sets}, "default": refine}}."""
    out = {}
    sources = next(iter(table.values()))["sources"]
    for src in sources:
        means = {}
        for k in REFINES:
            vals = [table[s]["sources"][src]["nme"][str(k)] for s in table]
            means[str(k)] = float(np.mean(vals)) if all(v is not None for v in vals) else None
        ok = [k for k in REFINES if means[str(k)] is not None]
        # lowest mean at the printed precision (0.01 %); ties -> fewer passes (REFINES is ascending)
        best = min(ok, key=lambda k: (round(100 * means[str(k)], 2), k)) if ok else None
        out[src] = {"means": means, "default": best}
    return out


# --------------------------------------------------------------------------- output


def _shown(path: str) -> str:
    """A path (or FORMAT:PATH) relative to the repository when it is under its parent, for the JSON."""
    fmt, sep, rest = str(path).rpartition(":")
    try:
        rel = os.path.relpath(rest, ROOT) if Path(rest).resolve().is_relative_to(ROOT.parent) else rest
    except ValueError:
        rel = rest
    return f"{fmt}{sep}{rel}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_report(report: dict) -> None:
    print("\nBox corrections (detector box -> landmark box), refitted on training faces vs detectors.py:")
    print(f"  {'detector':9s} {'':18s} {'dx':>7s} {'dy':>7s} {'sw':>7s} {'sh':>7s}  matched   IoU raw -> adjusted")
    for name, f in report["fit"].items():
        old, new = f["current"], f["refit"]
        print(f"  {name:9s} {'current':18s} " + " ".join(f"{old[k]:7.3f}" for k in "dx dy sw sh".split()))
        print(f"  {'':9s} {'refit (both sets)':18s} " + " ".join(f"{new[k]:7.3f}" for k in "dx dy sw sh".split())
              + f"  {f['matched']:4d}/{f['faces']:<4d} {f['iou_raw']:.2f} -> {f['iou_adjusted']:.2f}")
        for set_name, p in f["per_set"].items():
            print(f"  {'':9s} {'  ' + set_name:18s} " + " ".join(f"{p['adjust'][k]:7.3f}" for k in "dx dy sw sh".split())
                  + f"  {p['matched']:4d}/{p['faces']:<4d} {p['iou_raw']:.2f} -> {p['iou_adjusted']:.2f}")
    table, sets = report["table"], list(report["table"])
    print(f"\nMean NME (%) by box source and refine, model {report['model']}:")
    head = f"  {'source':11s} {'refine':>6s} " + " ".join(f"{s:>17s}" for s in sets) + f" {'mean':>7s}  default"
    print(head)
    for src, c in report["choice"].items():
        for k in REFINES:
            cells = []
            for s in sets:
                r = table[s]["sources"][src]
                v = r["nme"][str(k)]
                miss = f" ({r['missed']} missed)" if r["missed"] else ""
                cells.append(f"{'-' if v is None else f'{100 * v:.2f}'}{miss}".rjust(17))
            m = c["means"][str(k)]
            print(f"  {src:11s} {k:6d} " + " ".join(cells) + f" {'-' if m is None else f'{100 * m:7.2f}'}"
                  + ("  <-" if c["default"] == k else ""))
    print("  faces: " + ", ".join(f"{s} {table[s]['faces']} ({table[s]['norm']})" for s in sets)
          + "; missed faces are left out of that row's mean")
    print("\nThe same, refine 0 / 1 / 2 per cell (the layout of FaceLandmarkerOptions.refine's docstring):")
    fmt = lambda vals: " / ".join("-" if v is None else f"{100 * v:.2f}" for v in vals)
    print(f"  {'':10s} " + " ".join(f"{s[:18]:19s}" for s in sets) + " mean")
    for src, c in report["choice"].items():
        cells = [fmt(table[s]["sources"][src]["nme"][str(k)] for k in REFINES) for s in sets]
        print(f"  {src:10s} " + " ".join(f"{x:19s}" for x in cells) + " " + fmt(c["means"][str(k)] for k in REFINES))
    print("  defaults: " + ", ".join(f"{src} {c['default']}" for src, c in report["choice"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(resolve_model(None)),
                    help="flm ONNX file (default: the default shipped model)")
    ap.add_argument("--yunet", default=str(SHARED / "peers" / "yunet-n-320.onnx"), help="YuNet ONNX file")
    ap.add_argument("--fit-limit", type=int, default=400, help="training faces per set for the fit (0: all)")
    ap.add_argument("--limit", type=int, default=0, help="validation faces per set (0: all)")
    ap.add_argument("--pad", type=float, default=0.3, help="gray border around fit images, fraction of the size")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/defaults.json"))
    args = ap.parse_args(argv)
    args.fit_limit = args.fit_limit or None
    args.limit = args.limit or None

    t0 = time.perf_counter()
    landmarkers = {k: FaceLandmarker.create(args.model, FaceLandmarkerOptions(detector="none", refine=k,
                                                                                threads=args.threads))
                   for k in REFINES}
    specs = {"haar": "haar", "yunet": f"yunet:{args.yunet}"}
    current = {name: runtime_detector(landmarkers[0], spec) for name, spec in specs.items()}
    fits = refit(current, args)
    detectors = {name: runtime_detector(landmarkers[0], spec, fits[name]["adjust"]) for name, spec in specs.items()}
    table = measure(landmarkers, detectors, args)
    as_dict = lambda a: {"dx": a.dx, "dy": a.dy, "sw": a.sw, "sh": a.sh}
    report = {
        "command": " ".join(["python benchmarks/defaults.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": _shown(args.model),
        "model_sha256": hashlib.sha256(Path(args.model).read_bytes()).hexdigest(),
        "yunet": _shown(args.yunet),
        "fit_limit": args.fit_limit, "limit": args.limit,
        "fit": {name: {"current": as_dict(current[name].adjust), "refit": as_dict(f["adjust"]),
                       "matched": f["matched"], "faces": f["faces"], "iou_raw": f["iou_raw"],
                       "iou_adjusted": f["iou_adjusted"], "seconds": f["seconds"],
                       "per_set": {s: {**p, "adjust": as_dict(p["adjust"])} for s, p in f["per_set"].items()}}
                for name, f in fits.items()},
        "fit_data": {s: f"{_shown(spec)} training part (split_by_identity({args.val_fraction}, {args.seed})[0]), "
                        f"{args.fit_limit or 'all'} faces, padded {args.pad:.0%}" for s, spec in FIT_SETS.items()},
        "table": table,
        "choice": choose(table),
        "seconds": None,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print_report(report)
    with atomic_path(args.json) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    log(f"wrote {args.json} ({Path(args.json).stat().st_size} bytes, {report['seconds']} s)")


if __name__ == "__main__":
    main()
