"""Stability on video: flm's video mode next to its image mode and the peers, on clips made from real stills.

    python benchmarks/stability.py [--model flm/assets/NAME.onnx] [--faces 4] [--smoothing 0.5,4,1 ...]
    python benchmarks/stability.py --calibrate [--model ...]   # measures FaceLandmarkerOptions.track_min_quality

The clips (exact ground truth): a face from the held-out validation sets (youtube-faces-68 and
300w-train, split as `flm train --val split` splits them; half the faces from each, drawn with a
fixed seed among faces with a landmark box of at least 60 px that flm's Haar detector finds in
the first frame) is warped into a 640x480 frame over a smooth random background, through a soft
elliptical mask around the face. The similarity transform (translation, scale, in-plane
rotation) follows a known path: a still segment (1.5 s at 30 fps, the face at rest with a
130 px landmark box), then a moving segment (3 s: the centre sweeps +-130 px across and
+-50 px up and down, the size +-15 %, the roll +-12 deg; up to 2.6 face widths a second).
Every frame gets its own sensor noise (Gaussian, sigma 3 grey levels) and JPEG compression
(quality 80). The true landmarks follow by the same transform.

Systems, all on one thread (onnxruntime intra-op threads 1, cv2.setNumThreads(1)), called in turn
on each frame so background load hits them alike:
  - flm image mode: `FaceLandmarker.detect` on every frame (Haar + 1 + refine passes);
  - flm video mode: `detect_for_video` with the defaults (tracking + One Euro smoothing);
  - flm video mode with `smoothing=False` (tracking, raw landmarks);
  - (--smoothing) flm video mode with other One Euro settings (min_cutoff, beta, d_cutoff);
  - PFLD and Peppa (the wrappers of benchmarks/accuracy.py, their sessions rebuilt with one
    thread) on each frame's boxes from `accuracy.haar_boxes` (which scans down to 40 px, flm's
    default Haar down to 20 px at 640x480); their ms per frame is that Haar time plus their own.
The face a system reports is the one whose landmark box best overlaps the true landmark box
(IoU > 0.2, as in accuracy.py); a frame without one is missed.

Metrics (normaliser d: the true inter-ocular distance, outer eye corners 36/45):
  - NME: mean over frames of mean_k |p_k - g_k| / d, per segment;
  - jitter (NMJ-style): mean over pairs of consecutive frames of mean_k |e_k(t) - e_k(t-1)| / d,
    e = p - g: the frame-to-frame change of the error, so true motion is not counted as jitter;
  - lag: the delay tau (ms) for which the true path at t - tau best fits the prediction at t
    (mean point distance over the moving segments of all clips; tau from -100 to 400 ms);
  - ms per frame (mean, one thread); detector frames: frames on which flm ran its detector;
    missed: frames without the face.
NME, jitter and lag count only the frames every system found, so a system is not scored on
frames another one skipped. About 2 minutes on one core (4 clips). Writes
benchmarks/results/stability.json and stability.png (one clip: the nose tip's path per system
against the truth, and its error on the still segment); --calibrate writes
stability-calibration.json.
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

from accuracy import PEERS, PFLD, Peppa, haar_boxes, validation_part  # noqa: E402  (benchmarks/)
from flm.geometry import landmark_box, transform_points  # noqa: E402
from flm.runtime.shipped import resolve_model  # noqa: E402
from flm.runtime import FaceLandmarker, FaceLandmarkerOptions, box_iou  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = (f"udacity:{SHARED / 'youtube-faces-68'}", f"ibug-pts:{SHARED / '300w-train'}")
W, H, FPS = 640, 480, 30.0
STILL, MOVING = 45, 90  # frames
FACE_PX = 130.0  # landmark box side (the larger of w, h) at rest
NOISE_SIGMA, JPEG_QUALITY = 3.0, 80
NOSE_TIP = 30
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- the clips


def pose_at(t: float) -> tuple[float, float, float, float]:
    """(centre x, centre y, scale, roll in degrees) of the face `t` seconds into the clip."""
    m = max(0.0, t - STILL / FPS)  # seconds into the moving segment
    s = np.sin(2 * np.pi * m / 3.0)
    return W / 2 + 130.0 * s, H / 2 + 50.0 * np.sin(2 * np.pi * m / 1.5), 1.0 + 0.15 * s, 12.0 * s


def similarity(points: np.ndarray, t: float) -> np.ndarray:
    """2x3 affine from the still's pixels to the frame's at time `t`."""
    box = landmark_box(points)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    cx, cy, scale, roll = pose_at(t)
    m = cv2.getRotationMatrix2D(tuple(centre), roll, scale * FACE_PX / max(box[2] - box[0], box[3] - box[1]))
    m[:, 2] += np.array([cx, cy]) - centre  # the rotation keeps the centre in place; move it
    return m


def face_mask(shape, points: np.ndarray) -> np.ndarray:
    """float32 mask over the still: a soft ellipse around the face, with some hair and neck."""
    box = landmark_box(points)
    side = max(box[2] - box[0], box[3] - box[1])
    mask = np.zeros(shape[:2], np.float32)
    centre = (int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2 - 0.1 * side))
    cv2.ellipse(mask, centre, (int(0.8 * side), int(0.95 * side)), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(mask, (0, 0), 0.08 * side)


def background(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(40, 210, (6, 8, 3)).astype(np.float32)
    bg = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    return bg + cv2.GaussianBlur(rng.normal(0, 12, (H, W, 3)).astype(np.float32), (0, 0), 1.5)


def render(rgb, mask, bg, m, rng) -> np.ndarray:
    """One RGB uint8 frame: the still through `m` over the background, noise, JPEG."""
    face = cv2.warpAffine(rgb, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, m, (W, H), flags=cv2.INTER_LINEAR)[:, :, None]
    img = bg * (1 - alpha) + face * alpha + rng.normal(0, NOISE_SIGMA, (H, W, 3))
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1],
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])


def make_clip(sample, seed: int, n_frames: int = STILL + MOVING) -> dict:
    """frames (RGB uint8), truth (T, 68, 2), times (s), and the still's points, for one face."""
    rng = np.random.default_rng(seed)
    rgb, pts = sample.load().astype(np.float32), sample.points.astype(np.float64)
    mask, bg = face_mask(rgb.shape, pts), background(rng)
    times = np.arange(n_frames) / FPS
    ms = [similarity(pts, t) for t in times]
    return {"frames": [render(rgb, mask, bg, m, rng) for m in ms], "times": times, "points": pts,
            "truth": np.stack([transform_points(pts, m) for m in ms]), "image": str(sample.image)}


def pick_faces(n: int, seed: int) -> list[tuple]:
    """`n` held-out faces, half from each set, with a landmark box >= 60 px that Haar finds in
    the first frame of their clip: [(sample, the clip's seed)]."""
    rng, chosen = np.random.default_rng(seed), []
    for k, spec in enumerate(SETS):
        want, got = n // 2 + (n % 2 if k == 0 else 0), 0
        samples = validation_part(spec, "split", 0.15, 0).samples
        for i in rng.permutation(len(samples)):
            b = landmark_box(samples[i].points)
            if got == want or max(b[2] - b[0], b[3] - b[1]) < 60:
                continue
            first = make_clip(samples[i], seed + len(chosen), 1)
            gt = landmark_box(first["truth"][0])
            if any(box_iou(h, gt)[0, 0] > 0.2 for h in haar_boxes(first["frames"][0])):
                chosen.append((samples[i], seed + len(chosen)))
                got += 1
    return chosen


# --------------------------------------------------------------------------- the systems


class FlmSystem:
    def __init__(self, name: str, model: str, video: bool, **options):
        self.name, self.video = name, video
        self.lm = FaceLandmarker.create(model, FaceLandmarkerOptions(threads=1, color="RGB", **options))

    def reset(self) -> None:
        self.lm.reset_video()

    def run(self, rgb, t_s: float, haar) -> tuple[list[np.ndarray], float, bool]:
        """(landmarks of each face, ms, whether the detector ran)."""
        start = time.perf_counter()
        r = self.lm.detect_for_video(rgb, 1000 * t_s) if self.video else self.lm.detect(rgb)
        return [f.landmarks for f in r.faces], 1000 * (time.perf_counter() - start), r.detector_ran


class PeerSystem:
    """A peer wrapper of accuracy.py on the frame's Haar boxes, its session on one thread."""

    def __init__(self, wrapper):
        self.wrapper, self.name = wrapper, wrapper.name
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        from speed import repaired  # as accuracy.py's sessions: denormal weights flushed, same outputs
        model, _ = repaired(PEERS / wrapper.file)
        wrapper.sess = ort.InferenceSession(model or str(PEERS / wrapper.file), so, providers=["CPUExecutionProvider"])

    def reset(self) -> None:
        pass

    def run(self, rgb, t_s: float, haar) -> tuple[list[np.ndarray], float, bool]:
        boxes, haar_ms = haar
        start = time.perf_counter()
        faces = [self.wrapper(rgb, b) for b in boxes]
        return faces, haar_ms + 1000 * (time.perf_counter() - start), True


def systems_for(model: str, smoothings: list[str]) -> list:
    systems = [FlmSystem("flm image mode", model, False),
               FlmSystem("flm video mode", model, True),
               FlmSystem("flm video mode, no smoothing", model, True, smoothing=False)]
    for text in smoothings:  # e.g. "0.5,4,1": other One Euro settings, to compare with the defaults
        mc, beta, dc = (float(v) for v in text.split(","))
        systems.append(FlmSystem(f"flm video mode, One Euro {mc:g}/{beta:g}/{dc:g}", model, True,
                                 smoothing_min_cutoff=mc, smoothing_beta=beta, smoothing_d_cutoff=dc))
    for cls in (PFLD, Peppa):
        if (PEERS / cls.file).exists():
            systems.append(PeerSystem(cls()))
        else:
            print(f"{cls.__name__}: skipped ({PEERS / cls.file} not found)", file=sys.stderr)
    return systems


def best_match(faces: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """The face whose landmark box overlaps the true one most (IoU > 0.2), else NaNs (missed)."""
    gt = landmark_box(truth)
    ious = [box_iou(landmark_box(f), gt)[0, 0] if np.isfinite(f).all() else 0.0 for f in faces]
    if not ious or max(ious) <= 0.2:
        return np.full_like(truth, np.nan)
    return np.asarray(faces[int(np.argmax(ious))], np.float64)


def run_clip(systems, clip) -> dict:
    """Every system on every frame of the clip, in turn: name -> (pred (T, K, 2), ms (T,), detector frames)."""
    out = {s.name: ([], [], 0) for s in systems}
    for s in systems:
        s.reset()
    for rgb, t, truth in zip(clip["frames"], clip["times"], clip["truth"]):
        start = time.perf_counter()
        haar = (haar_boxes(rgb), 1000 * (time.perf_counter() - start))
        for s in systems:
            faces, ms, ran = s.run(rgb, t, haar)
            preds, times, runs = out[s.name]
            preds.append(best_match(faces, truth))
            times.append(ms)
            out[s.name] = (preds, times, runs + int(ran and s.__class__ is FlmSystem))
    return {k: (np.stack(p), np.array(m), r) for k, (p, m, r) in out.items()}


# --------------------------------------------------------------------------- metrics


def interocular(truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(truth[:, 36] - truth[:, 45], axis=1)


def frame_nme(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(T,) NME per frame, NaN where missed."""
    return np.linalg.norm(pred - truth, axis=2).mean(axis=1) / interocular(truth)


def frame_jitter(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(T-1,) normalised mean change of the error from frame t-1 to t, NaN where either missed."""
    e = pred - truth
    return np.linalg.norm(e[1:] - e[:-1], axis=2).mean(axis=1) / interocular(truth)[1:]


def lag_ms(clips, preds) -> float:
    """The delay of the true path that best fits the predictions on the moving segments."""
    taus = np.arange(-100, 401, 2) / 1000.0
    cost = np.zeros(len(taus))
    for clip, pred in zip(clips, preds):
        for j, tau in enumerate(taus):
            for i in range(STILL, STILL + MOVING):
                if np.isfinite(pred[i]).all():
                    g = transform_points(clip["points"], similarity(clip["points"], clip["times"][i] - tau))
                    cost[j] += np.linalg.norm(pred[i] - g, axis=1).mean() / np.linalg.norm(g[36] - g[45])
    return float(1000 * taus[int(np.argmin(cost))])


def found(pred: np.ndarray) -> np.ndarray:
    return np.isfinite(pred).all(axis=(1, 2))


def summarise(clips, runs: list[tuple], common: list[np.ndarray]) -> dict:
    """Pooled metrics of one system over the clips; `runs`: its (pred, ms, detector frames) per
    clip; NME, jitter and lag on the `common` frames (found by every system) only."""
    preds = [np.where(c[:, None, None], p, np.nan) for (p, _, _), c in zip(runs, common)]
    nme = np.concatenate([frame_nme(p, c["truth"]) for c, p in zip(clips, preds)])
    jit = np.concatenate([frame_jitter(p, c["truth"]) for c, p in zip(clips, preds)])
    still = np.tile(np.arange(STILL + MOVING) < STILL, len(clips))
    jstill = np.tile(np.arange(1, STILL + MOVING) < STILL, len(clips))
    return {"nme_still": float(np.nanmean(nme[still])), "nme_moving": float(np.nanmean(nme[~still])),
            "jitter_still": float(np.nanmean(jit[jstill])), "jitter_moving": float(np.nanmean(jit[~jstill])),
            "lag_ms": lag_ms(clips, preds),
            "ms_per_frame": float(np.mean(np.concatenate([m for _, m, _ in runs]))),
            "detector_frames": int(sum(r for _, _, r in runs)), "frames": int(len(nme)),
            "missed_frames": int(sum((~found(p)).sum() for p, _, _ in runs))}


# --------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    res = report["systems"]
    image_ms = res["flm image mode"]["ms_per_frame"]
    t = Table(title=f"stability: {report['clips']} clips x {STILL} still + {MOVING} moving frames, 640x480, "
                    f"noise sigma {NOISE_SIGMA:g} + JPEG {JPEG_QUALITY}, one thread; NME, jitter (% of inter-ocular) "
                    f"and lag on the {report['common_frames']} frames every system found")
    for c in ("system", "NME still", "NME moving", "jitter still", "jitter moving", "lag ms", "ms / frame",
              "x image mode", "detector frames", "missed"):
        t.add_column(c, justify="left" if c == "system" else "right")
    for name, r in res.items():
        t.add_row(name, f"{100 * r['nme_still']:.2f}", f"{100 * r['nme_moving']:.2f}", f"{100 * r['jitter_still']:.3f}",
                  f"{100 * r['jitter_moving']:.3f}", f"{r['lag_ms']:.0f}", f"{r['ms_per_frame']:.1f}",
                  f"{r['ms_per_frame'] / image_ms:.2f}",
                  f"{r['detector_frames']}/{r['frames']}" if name.startswith("flm") else "every",
                  f"{r['missed_frames']}/{r['frames']}")
    Console(width=200).print(t)


def plot(clip, runs: dict, path: Path) -> None:
    """A row per system: the nose tip's x over the clip and over the first 0.5 s of motion
    against the truth, and its error on the still segment less its mean (the jitter)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t, g = clip["times"], clip["truth"][:, NOSE_TIP]
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 2.3 * len(runs)), squeeze=False)
    dev = {name: p[:STILL, NOSE_TIP] - g[:STILL] for name, p in runs.items()}
    lim = max(1.0, max(np.nanmax(np.abs(d - np.nanmean(d, axis=0))) for d in dev.values()) * 1.1)
    start = slice(STILL, STILL + int(FPS / 2))
    for row, (name, pred) in zip(axes, runs.items()):
        p = pred[:, NOSE_TIP]
        for ax, sl in ((row[0], slice(None)), (row[1], start)):
            ax.plot(t[sl], g[sl, 0], "k--", lw=1, label="truth")
            ax.plot(t[sl], p[sl, 0], ".-" if sl is start else "-", lw=1, ms=3, label=name)
            ax.set_ylabel("nose tip x (px)")
        row[0].legend(loc="upper left", fontsize=8)
        d = dev[name] - np.nanmean(dev[name], axis=0)
        row[2].plot(t[:STILL], d[:, 0], lw=1, label="x")
        row[2].plot(t[:STILL], d[:, 1], lw=1, label="y")
        row[2].set_ylim(-lim, lim)
        row[2].set_ylabel("still: error - mean (px)")
        row[2].legend(loc="upper right", fontsize=8)
    for ax, title in zip(axes[0], ("whole clip (still, then moving)", "first 0.5 s of motion", "still segment")):
        ax.set_title(title, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    fig.suptitle(f"nose tip (point {NOSE_TIP}) per system vs truth: {Path(clip['image']).name}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------- track_min_quality


def calibrate(model: str, step: int = 4) -> dict:
    """Track quality (mean heatmap peak probability) of crops with and without a face, on every
    `step`-th held-out face: cut from the true landmark box ("face"); from a box off by 10 % of
    its size with the face rolled 12 deg ("face, tracked": a face moving ~3 face widths a second);
    a window of the same size elsewhere in the photo not touching the face ("no face"); the face
    half past the image's left edge ("half out")."""
    lm = FaceLandmarker.create(model, FaceLandmarkerOptions(threads=1, color="RGB"))
    rng, q = np.random.default_rng(0), {"face": [], "face, tracked": [], "no face": [], "half out": []}

    def quality(rgb, box):
        return float(lm.landmarks_for_boxes(rgb, np.array([box]))[1][0].mean())

    for spec in SETS:
        for s in validation_part(spec, "split", 0.15, 0).samples[::step]:
            rgb, b = s.load(), landmark_box(s.points)
            w, h = b[2] - b[0], b[3] - b[1]
            q["face"].append(quality(rgb, b))
            q["face, tracked"].append(tracked_quality(quality, rgb, s.points, rng))
            q["half out"].append(quality(rgb, b - np.array([b[0] + w / 2, 0, b[0] + w / 2, 0])))
            q["no face"] += [quality(rgb, win) for win in empty_windows(rgb.shape, b, rng)]
    return {k: {"n": len(v), **{f"p{p}": round(float(np.percentile(v, p)), 4) for p in (0.5, 1, 5, 50, 95, 99)},
                **{f"below {t}": round(float(np.mean(np.array(v) < t)), 4) for t in (0.10, 0.11, 0.12)}}
            for k, v in q.items()}


def empty_windows(shape, box, rng, n: int = 4, tries: int = 40) -> list[np.ndarray]:
    """Up to `n` windows of the face box's size inside the image, not touching the face."""
    w, h = box[2] - box[0], box[3] - box[1]
    found = []
    for _ in range(tries):
        x, y = rng.uniform(0, shape[1] - w), rng.uniform(0, shape[0] - h)
        win = np.array([x, y, x + w, y + h])
        if x >= 0 and y >= 0 and box_iou(win, box)[0, 0] == 0 and len(found) < n:
            found.append(win)
    return found


def tracked_quality(quality, rgb, points, rng) -> float:
    """Quality of the face rolled by +-12 deg, cropped from its landmark box moved by 10 %."""
    b = landmark_box(points)
    m = cv2.getRotationMatrix2D(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), float(rng.choice([-12.0, 12.0])), 1.0)
    rolled = cv2.warpAffine(rgb, m, (rgb.shape[1], rgb.shape[0]), borderMode=cv2.BORDER_REPLICATE)
    rb = landmark_box(transform_points(points.astype(np.float64), m))
    a = rng.uniform(0, 2 * np.pi)
    d = 0.1 * max(rb[2] - rb[0], rb[3] - rb[1]) * np.array([np.cos(a), np.sin(a)])
    return quality(rolled, rb + np.r_[d, d])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(resolve_model(None)),
                    help="flm ONNX file (default: the default shipped model)")
    ap.add_argument("--faces", type=int, default=4, help="clips, one face each (half from each validation set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoothing", action="append", default=[], metavar="MIN_CUTOFF,BETA,D_CUTOFF",
                    help="also run video mode with these One Euro settings (repeatable)")
    ap.add_argument("--calibrate", action="store_true", help="measure the track quality of face / no-face crops")
    ap.add_argument("--out", default=str(RESULTS), help="folder for stability.json and stability.png")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        doc = {"model": args.model, "quality": calibrate(args.model)}
        for kind, row in doc["quality"].items():
            print(f"{kind:14s} " + "  ".join(f"{k} {v:g}" for k, v in row.items()))
        write_json(doc, out / "stability-calibration.json")
        return
    started = time.perf_counter()
    faces = pick_faces(args.faces, args.seed)
    systems = systems_for(args.model, args.smoothing)
    clips, runs = [], {s.name: [] for s in systems}
    for i, (sample, clip_seed) in enumerate(faces):
        clips.append(make_clip(sample, clip_seed))
        for name, r in run_clip(systems, clips[-1]).items():
            runs[name].append(r)
        print(f"  clip {i + 1}/{len(faces)}: {Path(sample.image).name} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
    common = [np.logical_and.reduce([found(runs[name][i][0]) for name in runs]) for i in range(len(clips))]
    report = {"model": args.model, "clips": len(clips), "faces": [c["image"] for c in clips],
              "systems": {name: summarise(clips, r, common) for name, r in runs.items()},
              "common_frames": int(sum(c.sum() for c in common)),
              "seconds": round(time.perf_counter() - started, 1)}
    print_table(report)
    write_json(report, out / "stability.json")
    plot(clips[0], {name: r[0][0] for name, r in runs.items() if "One Euro" not in name}, out / "stability.png")
    print(f"wrote {out / 'stability.json'} and {out / 'stability.png'} ({report['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
