"""Accuracy of flm's shipped model against the peers, on people no model was trained on.

    python benchmarks/accuracy.py [--model flm/assets/flm-68.onnx] [--json benchmarks/results/accuracy.json]

Protocol (issue 6): ../shared/data/youtube-faces-68, validation split by identity exactly as
`flm train` makes it (15 % of the people, chosen by a salted SHA-256 of the name, seed 0);
NME normalised by the outer-eye-corner distance (points 36/45), median, failure rate at 8 %
and AUC of the CED curve up to 8 %. Two variants, every system in the same run:
  - gt-box: each system gets the tight box of the ground-truth landmarks and cuts its crop by
    its own published convention (PFLD, Peppa: ../shared/peers/README.md; dlib: the box as its
    rectangle; flm: its spec's crop rule via `FaceLandmarker.detect(image, boxes=...)`);
  - detector: each system starts from a face detector (the same OpenCV Haar detector, with
    flm's runtime settings, for flm, PFLD and Peppa; dlib's own HOG detector for dlib); the detection that best overlaps the true face is
    used, and a missed face counts as a failure (its NME is not in the mean).
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

from flm.geometry import landmark_box, nme, nme_summary, normaliser  # noqa: E402
from flm.pipeline.data import open_dataset  # noqa: E402  (torch-free)

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
        self.lm_gt = FaceLandmarker.create(str(model_path), FaceLandmarkerOptions(threads=2, refine=0))

    def __call__(self, rgb, box):
        return self.lm_gt.detect(rgb[:, :, ::-1], boxes=[box]).faces[0].landmarks

    def detect_and_predict(self, rgb):
        return [(f.box, f.landmarks) for f in self.lm.detect(rgb[:, :, ::-1]).faces]


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


def run(systems, samples, variant):
    results = {}
    for sys_ in systems:
        errs, missed, t0 = [], 0, time.perf_counter()
        for s in samples:
            rgb = s.load()
            gt = s.points.astype(np.float64)
            box = landmark_box(gt)
            if variant == "gt-box":
                pred = sys_(rgb, box)
            else:
                if hasattr(sys_, "detect_and_predict"):
                    cands = sys_.detect_and_predict(rgb)
                else:
                    boxes = sys_.detect(rgb) if hasattr(sys_, "detect") else haar_boxes(rgb)
                    cands = [(b, None) for b in boxes]
                best = max(cands, key=lambda c: iou(c[0], box), default=None)
                if best is None or iou(best[0], box) < 0.2:
                    missed += 1
                    continue
                pred = best[1] if best[1] is not None else sys_(rgb, best[0])
            errs.append(float(nme(pred[None], gt[None], normaliser(gt[None], "inter-ocular", "ibug68"))[0]))
        summ = nme_summary(np.array(errs))
        summ["missed"] = missed
        summ["failure_rate"] = (summ["failure_rate"] * len(errs) + missed) / len(samples)
        summ["seconds"] = round(time.perf_counter() - t0, 1)
        results[sys_.name] = summ
        print(f"  {variant:8s} {sys_.name:32s} NME {100 * summ['nme_mean']:.2f} %  ({summ['seconds']} s)",
              file=sys.stderr)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=f"udacity:{ROOT.parent / 'shared/data/youtube-faces-68'}")
    ap.add_argument("--model", default=str(ROOT / "flm/assets/flm-68.onnx"), help="flm ONNX file")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="gt-box,detector")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/accuracy.json"))
    args = ap.parse_args(argv)

    ds = open_dataset(args.data)
    _, val = ds.split_by_identity(args.val_fraction, args.seed)
    n_people = len({s.identity for s in val.samples})
    print(f"held-out people: {n_people}, faces: {len(val)}", file=sys.stderr)
    systems = [Flm(args.model)] if Path(args.model).exists() else []
    if not systems:
        print(f"warning: {args.model} not found; measuring peers only", file=sys.stderr)
    systems += [cls() for cls in (PFLD, Peppa) if (PEERS / cls.file).exists()]
    try:
        if DLIB_DAT.exists():
            systems.append(Dlib())
        else:
            print("dlib: skipped (apt-get install libdlib-data)", file=sys.stderr)
    except ImportError:
        print("dlib: skipped (pip install dlib-bin)", file=sys.stderr)

    report = {"data": args.data, "split": f"identity, {args.val_fraction:.0%} of people, seed {args.seed}",
              "people": n_people, "faces": len(val), "norm": "inter-ocular (36/45)", "variants": {}}
    for variant in args.variants.split(","):
        report["variants"][variant] = run(systems, val.samples, variant)

    from rich.console import Console
    from rich.table import Table
    for variant, res in report["variants"].items():
        t = Table(title=f"{variant}: {len(val)} faces of {n_people} held-out people")
        for c in ("system", "NME mean", "NME median", "failure >8%", "AUC@8%", "missed"):
            t.add_column(c, justify="right" if c != "system" else "left")
        for name, r in sorted(res.items(), key=lambda kv: kv[1]["nme_mean"]):
            t.add_row(name, f"{100 * r['nme_mean']:.2f} %", f"{100 * r['nme_median']:.2f} %",
                      f"{100 * r['failure_rate']:.1f} %", f"{r['auc']:.3f}", str(r["missed"]))
        Console().print(t)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
