"""`flm detect`: faces and landmarks in images, folders and videos with an exported ONNX model.

Torch-free: this command path imports typer, rich, numpy, OpenCV and onnxruntime only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from flm.errors import UsageError, check_at_least
from flm.fileio import atomic_path, log_written, output_file, output_folder

log = logging.getLogger("flm")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
EXAMPLE = "flm detect photo.jpg frames/ clip.mp4 --model flm-68 --out annotated/ --json faces.json"
MAX_BAD_FRAMES = 25  # undecodable frames in a row after which a video is taken to have ended


def collect_inputs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, "image" | "video") for files and the images/videos directly inside folders."""
    found: list[tuple[Path, str]] = []
    for p in paths:
        if p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not inside:
                raise UsageError(f"folder {str(p)!r} holds no images or videos "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})", example=EXAMPLE)
            found += [(q, "video" if q.suffix.lower() in VIDEO_SUFFIXES else "image") for q in inside]
        elif p.is_file():
            found.append((p, "video" if p.suffix.lower() in VIDEO_SUFFIXES else "image"))
        else:
            raise UsageError(f"input not found: {str(p)!r}", example=EXAMPLE)
    return found


def _out_name(path: Path, used: set[str], suffix: str | None = None) -> str:
    name = path.stem + (suffix or path.suffix.lower())
    stem, ext, i = Path(name).stem, Path(name).suffix, 1
    while name in used:  # two inputs with one file name (from different folders)
        name, i = f"{stem}-{i}{ext}", i + 1
    used.add(name)
    return name


def _write_image(dest: Path, bgr) -> None:
    import cv2

    started = time.perf_counter()
    ext = dest.suffix.lower() if dest.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".png"
    dest = dest.with_suffix(ext)
    ok, buf = cv2.imencode(ext, bgr)
    if not ok:
        raise UsageError(f"OpenCV cannot encode {dest.name}")
    with atomic_path(dest, suffix=ext) as tmp:
        tmp.write_bytes(buf.tobytes())
    log_written(dest, started)


def _detect_image(landmarker, path: Path, out_dir: Path | None, used: set[str], sunglasses: bool) -> dict:
    import cv2

    from flm.images import load_image
    from flm.runtime.draw import annotate

    rgb = load_image(path)
    t = time.perf_counter()
    result = landmarker.detect(rgb)
    ms = (time.perf_counter() - t) * 1000
    record = {"path": str(path), "kind": "image", "ms": round(ms, 2), **result.to_dict()}
    if out_dir is not None:
        dest = out_dir / _out_name(path, used)
        _write_image(dest, annotate(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), result, sunglasses=sunglasses))
        record["output"] = str(dest)
    return record


def _frames(cap, path: Path):
    """Yield (index, BGR frame, or None for a frame OpenCV cannot decode). Frames that fail at
    the end, after the last good one, are not yielded: there the video just ended early (the
    frame count in a header is often an estimate); they are logged once."""
    import cv2

    total, index, pending = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0, []
    while True:
        ok = cap.grab()
        if ok:
            ok, bgr = cap.retrieve()
            ok = ok and bgr is not None and bgr.size > 0
        if ok:
            yield from ((i, None) for i in pending)
            pending = []
            yield index, bgr
        elif index < total and len(pending) < MAX_BAD_FRAMES:
            pending.append(index)
        else:
            break
        index += 1
    if pending:
        log.warning("%s: frames from %d on (of the %d its header announces) cannot be read; taken as the end of "
                    "the video", path, pending[0], total)


def _video_frames(landmarker, cap, fps: float, path: Path, tmp: Path | None, sunglasses: bool):
    """Run every frame through `detect_for_video`; write annotated frames to `tmp` if given.
    A frame that cannot be decoded or used is reported with its index and skipped."""
    import cv2
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from flm.runtime.draw import annotate
    from flm.runtime.landmarker import InvalidInputError
    from flm.ui import console

    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    frames, skipped, ms, writer = [], [], 0.0, None
    landmarker.reset_video()
    try:
        with Progress(TextColumn(f"[bold]{path.name}"), BarColumn(), TextColumn("{task.completed}/{task.total} frames"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("video", total=total)
            for index, bgr in _frames(cap, path):
                bar.update(task, advance=1)
                try:
                    if bgr is None:
                        raise InvalidInputError("OpenCV cannot decode it (corrupt data?)")
                    t = time.perf_counter()
                    result = landmarker.detect_for_video(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), index * 1000.0 / fps)
                    ms += (time.perf_counter() - t) * 1000
                except InvalidInputError as e:
                    log.warning("%s: frame %d skipped: %s", path, index, e)
                    skipped.append(index)
                    continue
                frames.append({"frame": index, **result.to_dict()})
                if tmp is not None:
                    writer = writer or _open_writer(tmp, fps, bgr.shape, path)
                    writer.write(annotate(bgr, result, sunglasses=sunglasses))
    finally:
        if writer is not None:
            writer.release()
    if not frames:
        raise UsageError(f"video {str(path)!r} has no readable frames", example=EXAMPLE)
    return frames, skipped, ms


def _open_writer(tmp: Path, fps: float, shape, path: Path):
    import cv2

    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        raise UsageError(f"OpenCV cannot write an mp4 video for {path.name} (no mp4v encoder in this OpenCV build)")
    return writer


def _detect_video(landmarker, path: Path, out_dir: Path | None, used: set[str], sunglasses: bool) -> dict:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"OpenCV cannot open video {str(path)!r} (unsupported codec or not a video)", example=EXAMPLE)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not (0 < fps < 1000):
        fps = 30.0
    dest = out_dir / _out_name(path, used, ".mp4") if out_dir is not None else None
    started = time.perf_counter()
    try:
        if dest is None:
            frames, skipped, ms = _video_frames(landmarker, cap, fps, path, None, sunglasses)
        else:
            with atomic_path(dest, suffix=".mp4") as tmp:
                frames, skipped, ms = _video_frames(landmarker, cap, fps, path, tmp, sunglasses)
            log_written(dest, started)
    finally:
        cap.release()
    record = {"path": str(path), "kind": "video", "fps": fps, "frames": frames, "skipped_frames": skipped,
              "tracking": landmarker.options.tracking, "ms": round(ms / len(frames), 2),
              "frames_per_second": round(1000.0 * len(frames) / max(ms, 1e-9), 1),
              "detector_frames": sum(1 for f in frames if f["detector_ran"]),
              "faces_total": sum(len(f["faces"]) for f in frames)}
    if dest is not None:
        record["output"] = str(dest)
    return record


def warn_dropped(record: dict, max_faces: int) -> None:
    """Warn (one line) when the --max-faces cap left faces of an image or video without landmarks."""
    name = record["path"]
    if record["kind"] == "image":
        if record["dropped"]:
            found = len(record["faces"]) + record["dropped"]
            log.warning("%s: %d faces found, landmarks for the %d with the highest detector scores only "
                        "(--max-faces %d); to get all, raise it: --max-faces %d", name, found, max_faces,
                        max_faces, found)
        return
    capped = [f for f in record["frames"] if f["dropped"]]
    if capped:
        most = max(len(f["faces"]) + f["dropped"] for f in capped)
        log.warning("%s: in %d of %d frames more faces were found than --max-faces %d (up to %d in a frame); "
                    "those beyond it have no landmarks; to get all, raise it: --max-faces %d", name, len(capped),
                    len(record["frames"]), max_faces, most, most)


def show_shipped_models(as_json: bool) -> None:
    """`flm models --shipped [--json]`: the models flm ships, each described by its own file."""
    from flm.runtime.shipped import shipped_models
    from flm.ui import out as out_console

    found = shipped_models()
    if as_json:
        sys.stdout.write(json.dumps([m.to_dict() for m in found], indent=1) + "\n")
        return
    t = Table(title="models flm ships (FaceLandmarker.create(NAME), flm detect --model NAME; MB = 10^6 bytes)")
    for col, just in (("name", "left"), ("default", "left"), ("points", "right"), ("input", "left"),
                      ("output", "left"), ("convention", "left"), ("MB", "right"), ("path", "left")):
        t.add_column(col, justify=just)
    for m in found:
        d = m.to_dict()
        convention = ("gate: " if d["gated"] else "") + " / ".join(d["conventions"]) or "-"
        t.add_row(d["name"], "yes" if d["default"] else "", str(d["points"]), f"{d['input_size']} px",
                  d["output"], convention, f"{d['mb']:.2f}", d["path"])
    out_console.print(t)
    if not found:
        out_console.print("no models are bundled with this install of flm")


def detect(
    paths: List[Path] = typer.Argument(..., help="Images, folders of images/videos, or video files."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="A model flm ships, by name (see flm models --shipped), or an "
                                             "exported flm ONNX file (default: the default shipped model)."),
    detector: str = typer.Option("haar", "--detector", help="haar | yunet:PATH | none (whole image is the face)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write annotated images / videos here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every face's box, score, landmarks, pose."),
    sunglasses: bool = typer.Option(False, "--sunglasses", help="Draw sunglasses placed from eye and nose points."),
    max_faces: int = typer.Option(8, "--max-faces", help="Faces per image, best detector score first; "
                                  "a warning says when more were found."),
    min_face: Optional[int] = typer.Option(None, "--min-face", help="Smallest face box side, pixels "
                                           "(default: 1/40 of the image's shorter side, at least 20)."),
    refine: Optional[int] = typer.Option(None, "--refine",
                                         help="Extra passes cropping around the landmarks just found "
                                              "(default: 2 for haar, 1 for yunet and none)."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime threads (0: one per core)."),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking",
                                  help="Videos: follow each face from its last frame's landmarks and run the "
                                       "detector only now and then (default), or run it on every frame."),
):
    """Find faces and their landmarks; write annotated images/videos (--out) and JSON (--json)."""
    from flm.runtime.landmarker import FaceLandmarker, FaceLandmarkerOptions
    from flm.runtime.shipped import resolve_model
    from flm.ui import out as out_console

    for flag, value, least in (("--max-faces", max_faces, 1), ("--refine", refine, 0), ("--threads", threads, 0),
                               ("--min-face", min_face, 1)):
        check_at_least(flag, value, least, EXAMPLE)
    if json_out is not None:
        output_file(json_out, "--json")  # a folder there is refused now, not after every file is done
    inputs = collect_inputs(paths)
    model_path = resolve_model(model, example="--model {}")  # a shipped name, a file, or None: the default
    options = FaceLandmarkerOptions(detector=detector, max_faces=max_faces, min_face_size=min_face, refine=refine,
                                    threads=threads, color="RGB", tracking=tracking)  # frames are converted
    landmarker = FaceLandmarker.create(model_path, options)
    log.info("%r", landmarker)
    records = _detect_all(landmarker, inputs, out, sunglasses, max_faces)
    if json_out is not None:
        _write_detections(json_out, landmarker, records, options)
    out_console.print(_detect_table(landmarker, records))
    if out is not None:
        out_console.print(f"annotated files in {out}")


def _detect_all(landmarker, inputs, out: Path | None, sunglasses: bool, max_faces: int) -> list[dict]:
    """One record per input file (image or video), annotated copies written to `out`."""
    if out is not None:
        output_folder(out, "--out", create=False)  # checked now, made with the first annotated file
    records, used = [], set()
    for path, kind in inputs:
        run = _detect_video if kind == "video" else _detect_image
        records.append(run(landmarker, path, out, used, sunglasses))
        warn_dropped(records[-1], max_faces)
    return records


def _write_detections(path: Path, landmarker, records: list[dict], options) -> None:
    """`flm detect --json`: the model, detector and options, then every file's faces."""
    started = time.perf_counter()
    refine = landmarker.detector.default_refine if options.refine is None else options.refine
    doc = {"model": landmarker.source, "spec": landmarker.spec.to_dict(), "detector": landmarker.detector.describe(),
           "refine": refine, "max_faces": options.max_faces,
           "min_face_size": options.min_face_size,  # None: scaled with the image
           "tracking": options.tracking, "files": records}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    log_written(path, started)


def _detect_table(landmarker, records: list[dict]) -> Table:
    t = Table(title=f"flm detect — {landmarker.spec.preset} ({landmarker.spec.num_points} points), "
                    f"detector {landmarker.detector.describe()}")
    for col, just in (("input", "left"), ("kind", "left"), ("faces", "right"), ("ms / image", "right"),
                      ("frames / s", "right"), ("yaw / pitch / roll", "right"), ("output", "left")):
        t.add_column(col, justify=just)
    for r in records:
        if r["kind"] == "image":
            faces = str(len(r["faces"])) + (f" of {len(r['faces']) + r['dropped']}" if r["dropped"] else "")
            pose = r["faces"][0].get("pose") if r["faces"] else None
        else:
            with_face = sum(1 for f in r["frames"] if f["faces"])
            faces = f"{with_face}/{len(r['frames'])} frames"
            faces += f" ({len(r['skipped_frames'])} skipped)" if r["skipped_frames"] else ""
            pose = None
        pose_s = f"{pose['yaw']:.0f}° / {pose['pitch']:.0f}° / {pose['roll']:.0f}°" if pose else "-"
        speed = "-" if r["kind"] == "image" else f"{r['frames_per_second']:.1f}"
        kind = r["kind"] if r["kind"] == "image" else f"video ({'' if r['tracking'] else 'no '}tracking)"
        t.add_row(Path(r["path"]).name, kind, faces, f"{r['ms']:.1f}", speed, pose_s,
                  Path(r["output"]).name if "output" in r else "-")
    return t


def sample_photos(
    out: Path = typer.Option(Path("runs/demo/photos"), "--out", "-o", help="Folder to write the JPEGs into."),
):
    """Write public-domain photos of a real face (NASA's astronaut portrait, shipped inside
    scikit-image: no download) to try `flm detect` on. Needs the demo extra: pip install 'flm\\[demo]'."""
    from flm.runtime.samples import write_sample_photos
    from flm.ui import out as out_console

    for path in write_sample_photos(out):
        out_console.print(str(path), highlight=False, soft_wrap=True)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command()(detect)
    app.command("sample-photos")(sample_photos)

