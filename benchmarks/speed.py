"""Speed of flm's exported landmark model(s) next to the peers, measured in one run.

    python benchmarks/speed.py [--model FILE.onnx ...] [--json benchmarks/results/speed.json]

What is timed: model-only inference — `session.run` on an input tensor prepared beforehand
(no image decoding, cropping, normalisation, detection or decoding outside the graph), with
onnxruntime on the CPU, for batch 1 and a batch of 8 faces, with 1 and 2 intra-op threads.
Reported: the median milliseconds per face, and for each peer its ratio to flm's first model
at the same batch and thread count (× flm > 1: the peer is slower; "flm" is the first model). Runs of all models are
interleaved round by round, so background load on a shared machine hits them alike.

Peers (../shared/peers, read in place, never copied): PFLD [N,3,112,112]; Peppa slim160 takes
a fixed batch of 1, so its "batch 8" is 8 consecutive batch-1 runs (marked); the YuNet face
detector (through cv2.FaceDetectorYN, as the runtime uses it) and OpenCV's Haar cascade are
timed per image on a 640x480 frame in a second table, with flm's full pipeline
(`FaceLandmarker.detect`: crop, two passes, head pose; detector "none") for scale, and
`FaceLandmarker.detect(photo, boxes=[box])` on the astronaut portrait (an app's box: crop, one
pass; the head pose is solved only when `face.pose` is read, timed in a row of its own) beside
the model-only run of the same session, interleaved in the same loop: their ratio is the
runtime's cost per face on top of the model (target: <= 1.3x at 1 thread).

Without --model it times every model flm ships (`flm models --shipped`; the default one is the
reference), otherwise it exports the default preset with random weights (speed does not depend
on the weights; needs `flm[export]`). `benchmarks/speed_accuracy.py` reuses this module's timing
for its chart.
"""

from __future__ import annotations

import argparse
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

from flm.fileio import atomic_path  # noqa: E402
from flm.ui import console, out  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
BATCHES = (1, 8)
THREADS = (1, 2)
FROM_BOX = "flm FaceLandmarker.detect(photo, boxes), 1 face from an app's box (crop + 1 pass)"
FROM_BOX_POSE = "the same, reading face.pose (solved on first use)"
MODEL_ONLY = "flm model only (session.run on a ready input, same session)"
NOTE = ("model-only inference: session.run on a ready input tensor (no decoding, cropping, "
        "normalisation or detection); median ms per face; onnxruntime CPUExecutionProvider, "
        "idle-thread spinning off")


def _session(model, threads: int) -> ort.InferenceSession:
    """`model`: a path, or serialized ONNX bytes."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # Peppa lists its initializers as inputs: silence that warning
    # idle worker threads would otherwise spin after each run and steal the CPU from the next
    # model's run (interleaved here, and on a shared machine): measured 2.4 ms -> 15 ms per face
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def repaired(path: Path) -> tuple[bytes | None, str]:
    """The model with two publishing defects fixed in memory, or (None, why not).

    - weights listed as graph inputs (Peppa's file): a caller could override them, so
      onnxruntime neither constant-folds nor pre-packs them;
    - denormal float32 weights (|w| < 1.2e-38; both peers have hundreds of thousands): x86
      CPUs compute with them up to ~100x slower, and they change no output (they are below
      float32's normal range, far under any activation's precision), so they become 0; the
      benchmark checks the outputs are unchanged on its input.
    Timing both the file as published and the repaired graph is the fair comparison. Needs `onnx`.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None, "onnx not installed"
    m = onnx.load(str(path))
    init = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in init]
    moved = len(m.graph.input) - len(keep)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    flushed = 0
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            tiny = (np.abs(a) < np.finfo(np.float32).tiny) & (a != 0)
            if tiny.any():
                flushed += int(tiny.sum())
                t.CopyFrom(numpy_helper.from_array(np.where(tiny, 0, a).astype(np.float32), t.name))
    if not moved and not flushed:
        return None, "nothing to repair"
    return m.SerializeToString(), f"{flushed:,} denormal weights flushed, {moved} weight inputs made constants"


class Model:
    """One ONNX landmark model: its sessions per thread count and how to feed a batch."""

    def __init__(self, name: str, path: Path, is_flm: bool, model_bytes: bytes | None = None,
                 threads: tuple[int, ...] = THREADS, batches: tuple[int, ...] = BATCHES):
        self.name, self.path, self.is_flm = name, Path(path), is_flm
        self.mb = self.path.stat().st_size / 1e6
        self.sessions = {t: _session(model_bytes or path, t) for t in threads}
        inp = self.sessions[1].get_inputs()[0]
        self.input_name = inp.name
        self.chw = [int(v) for v in inp.shape[1:]]
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.outputs = [o.name for o in self.sessions[1].get_outputs()]
        if is_flm:  # only the landmarks: an app does not fetch the heatmaps (they are computed anyway)
            self.outputs = ["landmarks"] if "landmarks" in self.outputs else self.outputs
        rng = np.random.default_rng(0)
        self.inputs = {b: rng.normal(0, 1, (b, *self.chw)).astype(np.float32) for b in sorted({1, *batches})}

    def runs_batch(self, batch: int) -> bool:
        return self.fixed_batch in (None, batch)

    def time_once(self, threads: int, batch: int) -> float:
        """Seconds for `batch` faces: one run, or `batch` batch-1 runs for a fixed-batch model."""
        s = self.sessions[threads]
        if self.runs_batch(batch):
            x = self.inputs[batch]
            t = time.perf_counter()
            s.run(self.outputs, {self.input_name: x})
            return time.perf_counter() - t
        x = self.inputs[1]
        t = time.perf_counter()
        for _ in range(batch):
            s.run(self.outputs, {self.input_name: x})
        return time.perf_counter() - t


def max_output_diff(a: "Model", b: "Model") -> float:
    """Largest |difference| between two models' outputs on the same input (the repair changes nothing)."""
    x, t = a.inputs[1], min(a.sessions)
    ya = a.sessions[t].run(a.outputs, {a.input_name: x})
    yb = b.sessions[t].run(b.outputs, {b.input_name: x})
    return float(max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max() for u, v in zip(ya, yb)))


def flm_shipped_models(tmp: Path) -> list[Path]:
    """Every model flm ships, the default first; without any, the default preset exported with
    random weights."""
    from flm.runtime.shipped import DEFAULT_NAME, shipped_paths

    shipped = shipped_paths()
    if shipped:
        return sorted(shipped.values(), key=lambda p: p.stem != DEFAULT_NAME)
    console.print("[yellow]no shipped models found in flm/assets: exporting the default preset with random weights")
    from flm.exporters.onnx import export_onnx
    from flm.pipeline.models import DEFAULT_PRESET, build_model

    return [export_onnx(build_model(DEFAULT_PRESET), tmp / f"{DEFAULT_PRESET}.onnx")]


def measure_models(models: list[Model], rounds: int, per_round: int) -> dict:
    """{(model, threads, batch): [seconds per face, ...]} with the models interleaved per round."""
    times: dict[tuple, list[float]] = {}
    configs = [(m, t, b) for t in THREADS for b in BATCHES for m in models]
    for m, t, b in configs:  # warm-up: first runs allocate and pick kernels
        for _ in range(3):
            m.time_once(t, b)
    for _ in range(rounds):
        for m, t, b in configs:
            for _ in range(per_round):
                times.setdefault((m.name, t, b), []).append(m.time_once(t, b) / b)
    return times


def face_photo(flm_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(BGR image, (1, 4) face box): the public-domain astronaut portrait (`flm sample-photos`;
    needs scikit-image) with the box flm's Haar detector finds, else a noise frame and a fixed box."""
    from flm.errors import UsageError
    from flm.runtime import FaceLandmarker, FaceLandmarkerOptions
    from flm.runtime.samples import astronaut_rgb

    try:
        bgr = cv2.cvtColor(astronaut_rgb(), cv2.COLOR_RGB2BGR)
    except UsageError:
        console.print("[yellow]scikit-image not installed: timing detect-from-a-box on a noise frame")
        frame = np.clip(np.random.default_rng(0).normal(120, 30, (480, 640, 3)), 0, 255).astype(np.uint8)
        return frame, np.array([[64.0, 56.0, 192.0, 200.0]])
    faces = FaceLandmarker.create(str(flm_path)).detect(bgr).faces
    return bgr, faces[0].detection_box[None]


def measure_detectors(rounds: int, per_round: int, flm_path: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(120, 30, (480, 640, 3)), 0, 255).astype(np.uint8)
    rows = []
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    jobs = {"Haar cascade (OpenCV), 640x480": lambda: cascade.detectMultiScale2(gray, 1.1, 5, minSize=(40, 40))}
    yunet = PEERS / "yunet-n-320.onnx"
    if yunet.is_file():
        det = cv2.FaceDetectorYN.create(str(yunet), "", (640, 480), 0.6, 0.3, 5000)
        jobs["YuNet (cv2.FaceDetectorYN), 640x480"] = lambda: det.detect(frame)
        det320 = cv2.FaceDetectorYN.create(str(yunet), "", (320, 320), 0.6, 0.3, 5000)
        small = np.ascontiguousarray(frame[:320, :320])
        jobs["YuNet (cv2.FaceDetectorYN), 320x320"] = lambda: det320.detect(small)
    from flm.runtime import FaceLandmarker, FaceLandmarkerOptions

    landmarkers = {t: FaceLandmarker.create(_session(flm_path, t), FaceLandmarkerOptions(detector="none", threads=t))
                   for t in THREADS}
    face = np.ascontiguousarray(frame[:256, :256])
    photo, box = face_photo(flm_path)
    spec = landmarkers[1].spec
    x = np.random.default_rng(1).normal(0, 1, (1, spec.channels, spec.input_size, spec.input_size)).astype(np.float32)
    flm_jobs = {FROM_BOX: lambda lm: lm.detect(photo, boxes=box),
                FROM_BOX_POSE: lambda lm: lm.detect(photo, boxes=box).faces[0].pose,
                MODEL_ONLY: lambda lm: lm.session.run(["landmarks"], {"input": x}),
                "flm FaceLandmarker.detect, 1 face (crop + 2 passes + pose)": lambda lm: lm.detect(face)}
    times: dict[tuple, list[float]] = {}
    for t in THREADS:
        for _ in range(3):
            for job in flm_jobs.values():
                job(landmarkers[t])
    for _ in range(rounds):
        for t in THREADS:
            cv2.setNumThreads(t)
            for name, job in jobs.items():
                for _ in range(per_round):
                    s = time.perf_counter()
                    job()
                    times.setdefault((name, t), []).append(time.perf_counter() - s)
            for _ in range(per_round):
                for name, job in flm_jobs.items():
                    s = time.perf_counter()
                    job(landmarkers[t])
                    times.setdefault((name, t), []).append(time.perf_counter() - s)
    for (name, t), v in times.items():
        rows.append({"name": name, "threads": t, "ms_per_image": 1000 * statistics.median(v),
                     "ms_per_image_min": 1000 * min(v), "runs": len(v)})
    return rows


def from_box_ratios(detectors: list[dict]) -> dict[int, float]:
    """threads -> FaceLandmarker.detect from an app's box / model-only, both from the same loop."""
    by = {(r["name"], r["threads"]): r["ms_per_image"] for r in detectors}
    return {t: by[(FROM_BOX, t)] / by[(MODEL_ONLY, t)] for t in THREADS if (FROM_BOX, t) in by}


def markdown(models, by_key, ref, notes, detectors) -> str:
    lines = [f"ms per face, model-only inference (onnxruntime CPU); × = time relative to {ref}", "",
             "| model | MB | input | threads | batch 1 | × | batch 8 | × |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for m in models:
        for th in THREADS:
            r1, r8 = by_key[(m.name, th, 1)], by_key[(m.name, th, 8)]
            lines.append(f"| {m.name} | {r1['mb']:.1f} | {'x'.join(map(str, r1['input']))} | {th} | "
                         f"{r1['ms_per_face']:.2f} | {r1['ratio_to_flm']:.2f} | "
                         f"{r8['ms_per_face']:.2f}{'*' if r8['batch_note'] else ''} | {r8['ratio_to_flm']:.2f} |")
    lines += [""] + notes + ["", "| per image | threads | ms |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['threads']} | {r['ms_per_image']:.2f} |"
              for r in sorted(detectors, key=lambda r: (r["name"], r["threads"]))]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, help="flm ONNX file(s); the first is the reference")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "speed.json")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--markdown", action="store_true", help="Also print the tables as Markdown (for the README).")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        flm_paths = args.model or flm_shipped_models(Path(tmp))
        models = [Model(f"flm {p.stem}", p, True) for p in flm_paths]
        peers = {"PFLD (cunjian)": "pfld-68-cunjian.onnx", "Peppa slim160": "peppa-slim160-68.onnx"}
        missing, repairs = [], {}
        for name, file in peers.items():
            if (PEERS / file).is_file():
                models.append(Model(name, PEERS / file, False))
                fixed, what = repaired(PEERS / file)
                if fixed is not None:
                    models.append(Model(f"{name}, repaired†", PEERS / file, False, fixed))
                    diff = max_output_diff(models[-2], models[-1])
                    repairs[name] = f"{what}; max |output diff| {diff:.1e}"
            else:
                missing.append(file)
        console.print(f"timing {len(models)} models x threads {THREADS} x batch {BATCHES}, "
                      f"{args.rounds} interleaved rounds ...")
        times = measure_models(models, args.rounds, args.per_round)
        detectors = measure_detectors(max(3, args.rounds // 3), args.per_round, flm_paths[0])

    ref = models[0].name
    rows = []
    for m in models:
        for t in THREADS:
            for b in BATCHES:
                v = times[(m.name, t, b)]
                ms = 1000 * statistics.median(v)
                rows.append({"model": m.name, "file": m.path.name, "mb": round(m.mb, 2),
                             "input": [m.fixed_batch or "N", *m.chw], "threads": t, "batch": b,
                             "ms_per_face": ms, "ms_per_face_min": 1000 * min(v), "runs": len(v),
                             "batch_note": "" if m.runs_batch(b) else f"fixed batch {m.fixed_batch}: {b} runs"})
    by_key = {(r["model"], r["threads"], r["batch"]): r for r in rows}
    for r in rows:
        r["ratio_to_flm"] = r["ms_per_face"] / by_key[(ref, r["threads"], r["batch"])]["ms_per_face"]

    from rich.table import Table

    out.width = max(out.width, 120)  # keep model names and shapes on one line when piped

    t = Table(title=f"Landmark model speed, ms per face ({platform.processor() or platform.machine()}, "
                    f"onnxruntime {ort.__version__})", caption=NOTE)
    for col in ("model", "MB", "input", "threads", "batch 1", "× flm (b1)", "batch 8", "× flm (b8)"):
        t.add_column(col, justify="left" if col in ("model", "input") else "right")
    for m in models:
        for th in THREADS:
            r1, r8 = by_key[(m.name, th, 1)], by_key[(m.name, th, 8)]
            note = "*" if r8["batch_note"] else ""
            t.add_row(m.name, f"{r1['mb']:.1f}", "x".join(map(str, r1["input"])), str(th),
                      f"{r1['ms_per_face']:.2f}", f"{r1['ratio_to_flm']:.2f}",
                      f"{r8['ms_per_face']:.2f}{note}", f"{r8['ratio_to_flm']:.2f}")
    out.print(t)
    notes = []
    if any(r["batch_note"] for r in rows):
        notes.append("* Peppa's file has a fixed batch of 1: its batch-8 figure is 8 consecutive batch-1 runs.")
    if repairs:
        notes.append("† the same graph with publishing defects fixed in memory: "
                     + "; ".join(f"{k}: {v}" for k, v in repairs.items())
                     + " (denormal weights make x86 arithmetic slow; the outputs agree to the |diff| shown).")
    for n in notes:
        out.print(n)
    d = Table(title="Face detectors and flm's full pipeline, ms per image (not comparable to the table above)")
    for col in ("what", "threads", "ms / image"):
        d.add_column(col, justify="left" if col == "what" else "right")
    for r in sorted(detectors, key=lambda r: (r["name"], r["threads"])):
        d.add_row(r["name"], str(r["threads"]), f"{r['ms_per_image']:.2f}")
    out.print(d)
    ratios = from_box_ratios(detectors)
    out.print("FaceLandmarker.detect from an app's box / model-only (same session, same loop): "
              + ", ".join(f"{r:.2f}x at {t} thread{'s' if t > 1 else ''}" for t, r in ratios.items())
              + " (target <= 1.3x at 1 thread)")
    if missing:
        out.print(f"peers not found in {PEERS}: {', '.join(missing)}")

    if args.markdown:
        out.print(markdown(models, by_key, ref, notes, detectors))

    write_results(args.json, {"note": NOTE, "reference": ref, "opencv": cv2.__version__, "models": rows,
                              "detectors": detectors, "from_box_ratio": {str(t): r for t, r in ratios.items()},
                              "missing_peers": missing, "repairs": repairs})
    return 0


def write_results(path, doc: dict) -> None:
    """Write a benchmark's JSON atomically, with the machine, onnxruntime version and time it ran."""
    doc = {**doc, "machine": {"platform": platform.platform(), "cpu": platform.processor(),
                              "cpus": __import__("os").cpu_count()},
           "onnxruntime": ort.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    out.print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
