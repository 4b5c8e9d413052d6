"""Speed against accuracy: ms per face (1 thread, batch 1) vs mean NME on each validation set, for
every flm model and every peer; one chart and one table.

    python benchmarks/speed_accuracy.py [--accuracy benchmarks/results/accuracy.json] [--model FILE.onnx ...]
        [--png benchmarks/results/speed_accuracy.png] [--json benchmarks/results/speed_accuracy.json] [--markdown]

Speed is measured here, in one run, with `benchmarks/speed.py`'s harness: model-only
`session.run` on a ready input tensor, onnxruntime CPU, 1 intra-op thread, batch 1, idle-thread
spinning off, all models interleaved round by round (so background load hits them alike); the
peers' files with their denormal weights flushed in memory (speed.py's "repaired" graphs, whose
outputs are checked unchanged) - as published they are up to ~100x slower on x86. dlib is not an
ONNX model: it is timed as its shape predictor from a face box (`predictor(image, rect)`, one
thread), which samples the image itself, so its figure includes what is preprocessing for the
others. For each flm model the table also gives `FaceLandmarker.detect(image, boxes=[box])` (an
app's box: crop, one pass, head pose) timed in the same rounds, and its ratio to model-only.
Real faces: ../shared/data/youtube-faces-68 (ground-truth boxes), else the astronaut portrait.

Accuracy is read from the JSON of `benchmarks/accuracy.py` (not rerun here): the gt-box variant
(each system cuts its crop from the ground-truth landmark box by its own convention); mean
inter-ocular NME on youtube-faces-68 (held-out people) and 300w-train (held-out photos), and the
yaw-balanced box NME on aflw2000-3d-val. flm models are found there as "flm (FILE.onnx)"; a
system the JSON lacks gets no point on that set (the table says so).

Without --model, the flm models are every model flm ships (`flm models --shipped`), the default
one first; it is the reference of the "x" column.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import PEERS, Model, flm_shipped_models, max_output_diff, repaired, write_results  # noqa: E402

from flm.fileio import atomic_path  # noqa: E402
from flm.ui import console, out  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
YOUTUBE = ROOT.parent / "shared" / "data" / "youtube-faces-68"
DLIB_DAT = Path("/usr/share/dlib/shape_predictor_68_face_landmarks.dat")
# validation set in the accuracy JSON -> (panel title, table column, the NME key plotted)
SETS = {
    "youtube-faces-68": ("youtube-faces-68 held-out people, NME (inter-ocular)", "youtube-faces-68 NME",
                         "nme_mean"),
    "300w-train": ("300w-train held-out photos, NME (inter-ocular)", "300w-train NME", "nme_mean"),
    "aflw2000-3d-val": ("aflw2000-3d-val, yaw-balanced NME (box)", "aflw2000-3d-val yaw-bal. NME",
                        "yaw_balanced_nme"),
}
# peer -> (its ONNX file in ../shared/peers, or None for dlib; how its name starts in the accuracy JSON)
PEER_SYSTEMS = {
    "PFLD (cunjian)": ("pfld-68-cunjian.onnx", "PFLD"),
    "Peppa slim160": ("peppa-slim160-68.onnx", "Peppa"),
    "dlib 68": (None, "dlib"),
}
FACES = 40  # real faces cycled through for detect-from-a-box and dlib


def real_faces(n: int = FACES) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """([(BGR image, (4,) face box)], where from): youtube-faces-68 photos with the tight box of
    their ground-truth landmarks, spread over the set; else the astronaut portrait with Haar's box."""
    table = YOUTUBE / "landmarks.csv"
    if table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.reader(f))[1:]
        faces = []
        for r in rows[:: max(1, len(rows) // n)][:n]:
            img = cv2.imread(str(YOUTUBE / "images" / r[0]))
            pts = np.asarray(r[1:], np.float64).reshape(-1, 2)
            if img is not None:
                faces.append((img, np.array([*pts.min(axis=0), *pts.max(axis=0)])))
        return faces, f"{len(faces)} youtube-faces-68 photos, ground-truth boxes"
    from flm.runtime import FaceLandmarker
    from flm.runtime.samples import astronaut_rgb

    bgr = cv2.cvtColor(astronaut_rgb(), cv2.COLOR_RGB2BGR)
    return [(bgr, FaceLandmarker.create().detect(bgr).faces[0].detection_box)], "the astronaut portrait, Haar box"


class Timed:
    """Something timed per face outside speed.py's Model: a callable on face i."""

    def __init__(self, name: str, run):
        self.name, self.run = name, run

    def time_once(self, i: int) -> float:
        t = time.perf_counter()
        self.run(i)
        return time.perf_counter() - t


def build(flm_paths: list[Path], faces) -> tuple[list[Model], list[Timed], dict, list[str]]:
    """The ONNX models (flm, flushed peers), the other timed jobs (flm detect from a box, dlib),
    {system: {"kind": flm | peer | dlib, "accuracy": its name in the accuracy JSON (flm: exact;
    a peer: how it starts), "mb": file size}} and notes."""
    from flm.runtime import FaceLandmarker, FaceLandmarkerOptions

    models, jobs, systems, notes = [], [], {}, []
    for p in flm_paths:
        name = p.stem  # the shipped name, e.g. flm-68
        models.append(Model(name, p, True, threads=(1,), batches=(1,)))
        lm = FaceLandmarker.create(str(p), FaceLandmarkerOptions(threads=1))
        jobs.append(Timed(f"{name}: detect from a box", lambda i, lm=lm: lm.detect(faces[i % len(faces)][0],
                                                                                   boxes=[faces[i % len(faces)][1]])))
        systems[name] = {"kind": "flm", "accuracy": f"flm ({p.name})", "mb": p.stat().st_size / 1e6}
    for peer, (file, prefix) in PEER_SYSTEMS.items():
        if file is None:
            if not DLIB_DAT.is_file():
                notes.append(f"{peer}: not timed ({DLIB_DAT} missing: apt-get install libdlib-data)")
                continue
            try:
                import dlib
            except ImportError:
                notes.append(f"{peer}: not timed (pip install dlib-bin)")
                continue
            predictor = dlib.shape_predictor(str(DLIB_DAT))
            rgbs = [(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dlib.rectangle(*[int(round(v)) for v in box]))
                    for img, box in faces]
            jobs.append(Timed(peer, lambda i: predictor(*rgbs[i % len(rgbs)])))
            systems[peer] = {"kind": "dlib", "accuracy": prefix, "mb": DLIB_DAT.stat().st_size / 1e6}
            notes.append(f"{peer}: its shape predictor from a box on the image (it samples the image itself: "
                         "preprocessing included, unlike the ONNX models' model-only figures)")
            continue
        path = PEERS / file
        if not path.is_file():
            notes.append(f"{peer}: {path} not found; not timed")
            continue
        fixed, what = repaired(path)
        raw = Model(f"{peer}, as published", path, False, threads=(1,), batches=(1,))
        m = Model(peer, path, False, fixed, threads=(1,), batches=(1,)) if fixed is not None else raw
        if fixed is not None:
            notes.append(f"{peer}: {what}; max |output diff| {max_output_diff(raw, m):.1e} against the file as published")
        models.append(m)
        systems[peer] = {"kind": "peer", "accuracy": prefix, "mb": m.mb}
    return models, jobs, systems, notes


def measure(models: list[Model], jobs: list[Timed], rounds: int, per_round: int) -> dict[str, list[float]]:
    """{name: [seconds per face]}: speed.py's model-only runs (`Model.time_once`, 1 thread, batch 1)
    and the other jobs, all interleaved round by round after 3 warm-up runs each."""
    timers = [(m.name, lambda i, m=m: m.time_once(1, 1)) for m in models] + [(j.name, j.time_once) for j in jobs]
    for _, timer in timers:
        for i in range(3):
            timer(i)
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        for name, timer in timers:
            for k in range(per_round):
                times.setdefault(name, []).append(timer(r * per_round + k))
    return times


def accuracy_table(path: Path) -> tuple[dict, list[str]]:
    """{set: {system name in the JSON: NME plotted}} from accuracy.py's JSON (gt-box variant), and notes."""
    doc = json.loads(path.read_text())
    notes = []
    sets = doc.get("sets")
    if sets is None:  # the single-set file accuracy.py wrote before it measured three sets
        sets = {"youtube-faces-68": doc}
        notes.append(f"{path}: older single-set format (youtube-faces-68 only); rerun benchmarks/accuracy.py "
                     "for all three sets")
    table = {}
    for name, (_, _, key) in SETS.items():
        entry = sets.get(name)
        if entry is None:
            notes.append(f"{path}: no {name} results")
            continue
        res = entry.get("variants", {}).get("gt-box", {})
        table[name] = {system: r[key] for system, r in res.items() if r.get(key) is not None}
    return table, notes


def lookup(acc: dict, pattern: str) -> str | None:
    """The accuracy JSON's name for a system: exact for flm ("flm (FILE.onnx)"), by prefix for a peer."""
    if pattern in acc:
        return pattern
    return next((k for k in acc if k.startswith(pattern + " ") or k.startswith(pattern + "(")), None)


def plot(rows: list[dict], png: Path) -> None:
    """One panel per validation set: NME against ms per face (log scale), a labelled point per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    style = {"flm": ("tab:red", "*", 110), "peer": ("tab:blue", "o", 45), "dlib": ("tab:gray", "s", 40)}
    fig, axes = plt.subplots(1, len(SETS), figsize=(5.2 * len(SETS), 4.4), squeeze=False)
    xs = [r["ms"] for r in rows]
    lo, hi = min(xs) / 1.6, max(xs) * 1.8
    for ax, (name, (title, _, _)) in zip(axes[0], SETS.items()):
        drawn = [r for r in rows if name in r["nme"]]
        for r in drawn:
            colour, marker, size = style[r["kind"]]
            ax.scatter(r["ms"], 100 * r["nme"][name], s=size, c=colour, marker=marker, zorder=3)
            ax.annotate(r["system"] + ("*" if r["kind"] == "dlib" else ""), (r["ms"], 100 * r["nme"][name]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not in the accuracy JSON", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.margins(y=0.12)  # room for the labels of the highest points
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ms per face (1 thread, batch 1; log scale)")
        ax.set_ylabel("mean NME (%), lower is better")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("speed vs accuracy from the ground-truth box: flm models (stars) and peers; lower left is "
                 "faster and more accurate. Model-only onnxruntime time, peers' denormals flushed; "
                 "*dlib: its predictor from a box", fontsize=9)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    out.print(f"wrote {png}")


def markdown(rows: list[dict], ref: str) -> str:
    head = ("| system | MB | ms / face | x " + ref + " | " + " | ".join(c for _, c, _ in SETS.values())
            + " | detect from a box, ms (x model) |")
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(SETS) + "---:|"]
    for r in rows:
        nme = [f"{100 * r['nme'][s]:.2f} %" if s in r["nme"] else "-" for s in SETS]
        box = f"{r['from_box_ms']:.2f} ({r['from_box_ratio']:.2f})" if "from_box_ms" in r else "-"
        lines.append(f"| {r['system']} | {r['mb']:.1f} | {r['ms']:.2f} | {r['x_ref']:.2f} | " + " | ".join(nme)
                     + f" | {box} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, help="flm ONNX file(s) (default: every shipped model)")
    ap.add_argument("--accuracy", type=Path, default=RESULTS / "accuracy.json",
                    help="benchmarks/accuracy.py's JSON (default: %(default)s)")
    ap.add_argument("--png", type=Path, default=RESULTS / "speed_accuracy.png")
    ap.add_argument("--json", type=Path, default=RESULTS / "speed_accuracy.json")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="Also print the table as Markdown (for the README).")
    args = ap.parse_args(argv)
    if not args.accuracy.is_file():
        console.print(f"[red]{args.accuracy} not found: run python benchmarks/accuracy.py first")
        return 2
    acc, notes = accuracy_table(args.accuracy)
    cv2.setNumThreads(1)

    faces, faces_from = real_faces()
    with tempfile.TemporaryDirectory() as tmp:
        flm_paths = args.model or flm_shipped_models(Path(tmp))
        models, jobs, systems, build_notes = build(flm_paths, faces)
        console.print(f"timing {len(models)} models + {len(jobs)} other jobs, 1 thread, batch 1, "
                      f"{args.rounds} interleaved rounds ...")
        times = measure(models, jobs, args.rounds, args.per_round)
    notes += build_notes

    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    ref = next(iter(systems))
    rows = []
    for system, info in systems.items():
        r = {"system": system, "kind": info["kind"], "mb": round(info["mb"], 2), "ms": ms[system],
             "ms_min": 1000 * min(times[system]), "runs": len(times[system]), "x_ref": ms[system] / ms[ref], "nme": {}}
        for s, table in acc.items():
            key = lookup(table, info["accuracy"])
            if key is None:
                notes.append(f"{system}: not in {args.accuracy.name} for {s}")
            else:
                r["nme"][s] = table[key]
        if info["kind"] == "flm":
            r["from_box_ms"] = ms[f"{system}: detect from a box"]
            r["from_box_ratio"] = r["from_box_ms"] / r["ms"]
        rows.append(r)

    from rich.table import Table

    out.width = max(out.width, 160)
    t = Table(title=f"Speed vs accuracy ({platform.processor() or platform.machine()}, onnxruntime {ort.__version__}; "
                    f"1 thread, batch 1, median of {args.rounds * args.per_round} runs; NME from the ground-truth box)")
    for col in ["system", "MB", "ms / face", f"x {ref}", *(c for _, c, _ in SETS.values()),
                "detect from a box, ms (x model)"]:
        t.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        t.add_row(r["system"], f"{r['mb']:.1f}", f"{r['ms']:.2f}", f"{r['x_ref']:.2f}",
                  *[f"{100 * r['nme'][s]:.2f} %" if s in r["nme"] else "-" for s in SETS],
                  f"{r['from_box_ms']:.2f} ({r['from_box_ratio']:.2f})" if "from_box_ms" in r else "-")
    out.print(t)
    out.print(f"faces for detect-from-a-box and dlib: {faces_from}")
    for n in notes:
        out.print(f"note: {n}")
    if args.markdown:
        out.print(markdown(rows, ref))

    plot(rows, args.png)
    write_results(args.json, {
        "note": "ms per face: model-only session.run (onnxruntime CPU, 1 thread, batch 1), peers' denormal "
                "weights flushed; dlib: its predictor from a box. NME: gt-box variant of the accuracy JSON "
                "(aflw2000-3d-val: yaw-balanced box NME).",
        "accuracy_json": str(args.accuracy), "faces": faces_from, "reference": ref, "rows": rows, "notes": notes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
