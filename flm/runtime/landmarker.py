"""`FaceLandmarker`: faces and their landmarks from an exported flm ONNX model, without torch.

The pipeline for one image:
1. decode it to RGB uint8 (`flm.images`), whatever it was (BGR/RGB/gray/BGRA, uint8/float) — a
   3-channel uint8 array is used as given and converted to RGB only if a detector needs it, the
   model's crops being cut from it directly (`_Image`);
2. find faces with a `FaceDetector` (or take the app's `boxes`), drop those smaller than
   `min_face_side` (by default a fraction of the image), keep the `max_faces` best and count
   the rest in `FaceLandmarkerResult.dropped`;
3. turn each detector box into the landmark box the model was trained around (a per-detector
   `BoxAdjust`), cut the crop with `flm.geometry.crop_matrix` + `warp` + `to_model_input` —
   the very functions training and evaluation use — and run all faces in one batch;
4. map the points back to the image with the inverse affine, then cut a new crop around the
   landmark box just found and run again (`refine` passes), which removes most of the
   difference between detector framing and training framing;
5. head pose from 68 points (`flm.runtime.pose`).

Video (`detect_for_video`): each face is cropped from its landmarks in the frame before
(`flm.runtime.tracking`), so the detector runs only to find faces, and its points are smoothed
(`flm.runtime.smoothing`).

Images smaller than `MIN_IMAGE_SIDE` pixels a side give an empty result (they cannot hold a
face); empty arrays, NaN/inf pixels and unusable shapes raise `InvalidInputError`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

from flm.errors import FlmError, ModelFileError, UsageError
from flm.geometry import (crop_matrix, invert_affine, landmark_box, soft_argmax, swap_channels, to_model_input,
                          transform_points, warp)
from flm.images import load_image, to_rgb_uint8
from flm.runtime.detectors import FaceDetector, WholeImageDetector, box_iou, make_detector
from flm.runtime.modelfile import open_session, read_spec
from flm.runtime.pose import HeadPose, head_pose
from flm.runtime.shipped import ASSETS, DEFAULT_NAME, resolve_model
from flm.runtime.smoothing import FaceTracker
from flm.runtime.tracking import LandmarkTrack, LandmarkTracker, track_quality
from flm.spec import CONFIDENCE, HEATMAPS, INPUT, LANDMARKS, CropRule, ModelSpec

log = logging.getLogger("flm")

DEFAULT_MODEL = ASSETS / f"{DEFAULT_NAME}.onnx"  # the file create() opens when given no model
MIN_IMAGE_SIDE = 8
# min_face_size=None: the smallest face is this fraction of the image's shorter side, at least
# MIN_FACE_FLOOR pixels (see FaceLandmarkerOptions.min_face_size for why these numbers)
MIN_FACE_FRACTION = 1 / 40
MIN_FACE_FLOOR = 20


class InvalidInputError(FlmError, ValueError):
    """An image, box list or timestamp the runtime cannot use; the message says what was expected."""


@dataclass
class FaceLandmarkerOptions:
    """How a `FaceLandmarker` finds faces and runs its model.

    detector: "haar" (default, ships with OpenCV), "yunet:PATH" (a YuNet ONNX file), "none"
        (the whole image is one face), or a ready `FaceDetector`.
    max_faces: keep at most this many faces per image (highest detector score first); the
        result's `dropped` counts the faces found beyond it (`flm detect` warns, `--max-faces`).
    min_face_size: smallest detector box side, pixels, for any detector but "none" (a ready
        `FaceDetector`'s own minimum applies too; app boxes are kept whatever their size).
        None (default): 1/40 of the image's shorter side, at least 20 px (`min_face_side`):
        20 px up to 800 px, 27 px at 1080p, 76 px in a 4032x3024 photo. Why: a fixed 40 px
        missed 10 of 43 faces of a group photo, while small faces still landmark well (the
        astronaut portrait scaled to a 30 px Haar box: points within 2.3 % of the inter-ocular
        distance of the full-size face's); scaled with the image, Haar's scan (work ~ pixels /
        min size^2) costs about the same at any resolution (above 1280 px it already scans at
        1280 px, where its 24 px window is 1/53 of the longer side). The cost: under ~1000 px
        Haar scans down to 24 px, about 1.7x the Haar time of a 40 px minimum (215 vs 127 ms
        per ~500 px 300-W photo, one thread, the same annotated faces found); an app whose
        faces are large (a webcam) can set e.g. 80.
    detector_score: drop detections scoring below this (None: the detector's default).
    nms_iou: IoU above which overlapping detections are merged.
    refine: extra passes, each cropping around the landmarks of the previous one. None: the box
        source's default — 0 for app boxes (`detect(image, boxes=...)`), 1 for YuNet, 2 for Haar
        (and 1 for "none", not measured). Each is the refine with the lowest mean NME over three
        validation sets (a tie goes to fewer passes), from `python benchmarks/defaults.py` with
        the default model, flm-68-distilled (results: benchmarks/results/defaults.json); mean NME %,
        refine 0 / 1 / 2:
                   youtube held-out    300w held-out       aflw2000-3d-val     mean
          app box  4.10 / 4.23 / 4.28  3.67 / 3.67 / 3.69  4.66 / 4.74 / 4.78  4.14 / 4.21 / 4.25
          Haar     5.29 / 4.67 / 4.47  4.85 / 4.28 / 4.10  5.17 / 4.77 / 4.73  5.10 / 4.57 / 4.43
          YuNet    4.41 / 4.34 / 4.33  3.82 / 3.72 / 3.71  5.36 / 5.30 / 5.37  4.53 / 4.45 / 4.47
        (567 / 301 / 198 faces; youtube and 300w inter-ocular, aflw2000 over the landmark box
        sqrt(w*h); app box = the tight box of the true landmarks; faces a detector missed, Haar
        25 / 29 / 74 and YuNet 0 / 0 / 1, are left out of its row). A pass helps a rough box
        and costs a little on a good one (the model's crop of its own landmark box is not the
        exact box). YuNet's was 2 with this model's previous last stage (d3: 4.56 / 4.48 / 4.46)
        and 1 with d2 (4.57 / 4.50 / 4.50); flm-68 (app box means 4.24 / 4.30 / 4.34, Haar 4.99 / 4.48 /
        4.40, YuNet 4.55 / 4.46 / 4.48) and the three flm-68 models before it (s8, youtube data
        only; m2; m3) chose 0 / 2 / 1 as well (s8 app box 5.45 / 5.67 / 5.83 %).
    threads: onnxruntime intra-op threads (0: onnxruntime's default, one per core).
    providers: onnxruntime execution providers (default: CPU).
    color: channel order of 3/4-channel arrays given to `detect`: "BGR" (OpenCV) or "RGB".
    crop: override the model's crop rule (None: the rule in the model's spec — keep it).
    pose: give 68-point faces a head pose (`Face.pose`, solved when first read).
    smoothing: One Euro smoothing of the landmarks in `detect_for_video` (False: raw landmarks).
    smoothing_min_cutoff / smoothing_beta / smoothing_d_cutoff: the One Euro filter of
        `detect_for_video` (`flm.runtime.smoothing.OneEuroFilter`: cut-off in Hz, plus beta per
        face size a second of each point's speed; the speed itself smoothed at d_cutoff Hz).
        Defaults 0.3 / 40 / 0.3 from `python benchmarks/stability.py --smoothing 0.5,4,1`
        (flm-68, 4 clips, tracking; % of the inter-ocular distance): still-face jitter 0.84
        raw -> 0.12 (image mode 0.74), NME while moving at up to 2.6 face widths a second 5.22
        raw -> 5.46 (image mode 5.45), lag 4 ms. The earlier 0.5 / 4 / 1 smoothed a still face
        a little more (0.08) but lagged 16 ms and cost 7.49 % NME while moving. Jitter much
        larger than flm-68's partly reads as motion: 0.8 px of noise on a 100 px face is only
        about halved.
    tracking: in `detect_for_video`, crop each face from its previous frame's landmarks and run
        the detector only to find faces (`flm.runtime.tracking`): a frame then costs one model run
        per face instead of a detector run plus 1 + refine model runs. False: the detector runs
        on every frame, as in `detect`, and faces are matched to the last frame's by IoU. A model
        with no per-point confidence (a coordinate regressor without a `confidence` output) has
        no signal that a track was lost, so its video mode always works as with False (a simple
        regressor tracking its own points drifted from 0.3 to 0.43 NME in a test clip).
    redetect_interval_ms: with tracking, while fewer than `max_faces` faces are tracked, the
        detector runs again after this much stream time to pick up faces that came into view
        (a new face shows within this delay); 0: on every frame. A frame it runs on costs about
        what `detect` costs (Haar at 640x480: 100-200 ms on one core), so a real-time app may
        lower `max_faces` to the faces it wants (with all of them tracked it never runs) or
        raise this.
    track_min_quality: with tracking, a face whose quality (the mean per-point confidence, the
        heatmap peak probability; see `flm.runtime.tracking.track_quality`) falls below this is
        lost, and the detector runs on that frame to find it again (same track id if found near
        where it was, the track ends if not). Measured with the shipped flm-68 on 218 held-out
        faces (every 4th of youtube-faces-68's and 300w-train's; `python benchmarks/stability.py
        --calibrate`): crops cut from the true
        landmark box score 0.127 at the 0.5th percentile (median 0.139), a face rolled 12 deg and
        cropped 10 % off, as a fast-moving face is, 0.121 (median 0.138); windows of the same size
        elsewhere in the photo, without the face, 0.097 at the 95th percentile and 0.107 at the
        99th (median 0.064), faces half out of the image 0.105 at the 99th (median 0.078). 0.11
        keeps every one of the 218 moved faces and drops 99.6 % of the empty windows and 99 %
        of the half-out faces in one frame (the two previous flm-68: 96-99.6 % and 99 %, the same
        0.11); it sits near the empty windows' high end because a face lost by mistake costs a
        detector run (and its track, if the detector misses it), while a track kept on an empty
        crop is tested again on the next frame. The default model since, flm-68-distilled (same
        24x24 heatmaps, taught by flm-68; benchmarks/results/stability-calibration.json): moved
        faces 0.116 at the 0.5th percentile (median 0.139), empty windows 0.099 at the 99th, half
        out 0.091; at 0.11 one moved face of 218 is lost (it scores under 0.10 as well), every
        empty window and 99.5 % of the half-out faces are dropped, so 0.11 stays. A model with
        another heatmap size needs its own value; for a model without confidence (always 1.0) only a landmark box whose centre
        leaves the image ends a track.
    track_iou: a face (a detection, or with tracking off the next frame's face) whose landmark
        box overlaps a track's by more than this IoU is that track's face.
    """

    detector: str | FaceDetector = "haar"
    max_faces: int = 8
    min_face_size: int | None = None
    detector_score: float | None = None
    nms_iou: float = 0.4
    refine: int | None = None
    threads: int = 0
    providers: tuple[str, ...] | None = None
    color: str = "BGR"
    crop: CropRule | None = None
    pose: bool = True
    smoothing: bool = True
    smoothing_min_cutoff: float = 0.3
    smoothing_beta: float = 40.0
    smoothing_d_cutoff: float = 0.3
    tracking: bool = True
    redetect_interval_ms: float = 1000.0
    track_min_quality: float = 0.11
    track_iou: float = 0.3

    def validate(self) -> None:
        if self.color not in ("BGR", "RGB"):
            raise UsageError(f"FaceLandmarkerOptions.color must be 'BGR' or 'RGB', got {self.color!r}",
                             example="FaceLandmarkerOptions(color='RGB')")
        for name in ("max_faces", "refine", "threads"):
            v = getattr(self, name)
            if name == "refine" and v is None:
                continue
            if not isinstance(v, int) or v < (1 if name == "max_faces" else 0):
                raise UsageError(f"FaceLandmarkerOptions.{name} must be an integer >= "
                                 f"{1 if name == 'max_faces' else 0}, got {v!r}",
                                 example="FaceLandmarkerOptions(max_faces=8, refine=1, threads=2)")
        m = self.min_face_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise UsageError(f"FaceLandmarkerOptions.min_face_size must be None (scaled with the image) or an "
                             f"integer >= 1 pixel, got {m!r}", example="FaceLandmarkerOptions(min_face_size=40)")
        self._validate_video()

    def _validate_video(self) -> None:
        for name, low, high in (("redetect_interval_ms", 0.0, float("inf")), ("track_min_quality", 0.0, 1.0),
                                ("track_iou", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise UsageError(f"FaceLandmarkerOptions.{name} must be a number from {low} to {high}, got {v!r}",
                                 example="FaceLandmarkerOptions(redetect_interval_ms=1000, track_min_quality=0.11)")


def min_face_side(min_face_size: int | None, image_shape) -> float:
    """The smallest detector box side (pixels) kept in an image of `image_shape` (h, w, ...):
    `min_face_size` itself, or for None `MIN_FACE_FRACTION` of the shorter side, at least
    `MIN_FACE_FLOOR` (see `FaceLandmarkerOptions.min_face_size`)."""
    if min_face_size is not None:
        return float(min_face_size)
    return max(float(MIN_FACE_FLOOR), MIN_FACE_FRACTION * min(image_shape[0], image_shape[1]))


@dataclass
class Face:
    """One face: `box` is the tight box of the final landmarks (x0, y0, x1, y1; for models whose
    points span under a pixel, the last crop's box), `detection_box`
    the detector's (or the app's) box it started from, `score` the detector's score (1.0 for
    app boxes and detector "none"), `landmarks` (K, 2) float64 image pixels with pixel
    centres at integers, `confidence` (K,) per point where the model has one, `pose` for
    68-point models, `track_id` in video mode."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    detection_box: np.ndarray
    confidence: np.ndarray | None = None
    track_id: int | None = None
    pose_image_shape: tuple | None = field(default=None, repr=False)  # the image `pose` is solved in; None: no pose

    @cached_property
    def pose(self) -> HeadPose | None:
        """Head pose from the 68 landmarks (None for other models or with `FaceLandmarkerOptions.pose`
        off), solved on first use and kept: a PnP solve costs about a fifth of the fast model's run,
        so a caller who never reads it does not pay for it."""
        return None if self.pose_image_shape is None else head_pose(self.landmarks, self.pose_image_shape)

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
             "detection_box": [round(float(v), 2) for v in self.detection_box],
             "landmarks": np.round(self.landmarks, 2).tolist()}
        if self.confidence is not None:
            d["confidence"] = np.round(self.confidence, 4).tolist()
        if self.pose is not None:
            d["pose"] = self.pose.as_dict()
        if self.track_id is not None:
            d["track_id"] = self.track_id
        return d


@dataclass
class FaceLandmarkerResult:
    """Faces of one image, best detector score first; empty (never None) when there is none.

    `dropped`: faces found (detector boxes that passed the size, score and overlap checks, or app
    boxes) but not landmarked because `max_faces` were already kept; 0 when none was. In video
    mode with tracking, as of the detector's last run.
    `detector_ran`: whether the face detector ran for this image or frame (video mode with
    tracking runs it only now and then; see `FaceLandmarkerOptions.tracking`)."""

    faces: list[Face] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)  # (width, height)
    timestamp_ms: float | None = None
    dropped: int = 0
    detector_ran: bool = False

    @property
    def found(self) -> int:
        """Faces found before the `max_faces` cap (those kept plus `dropped`)."""
        return len(self.faces) + self.dropped

    def __len__(self) -> int:
        return len(self.faces)

    def __bool__(self) -> bool:
        return bool(self.faces)

    def to_dict(self) -> dict:
        d = {"width": self.image_size[0], "height": self.image_size[1], "faces": [f.to_dict() for f in self.faces],
             "dropped": self.dropped}
        if self.timestamp_ms is not None:
            d["timestamp_ms"] = self.timestamp_ms
            d["detector_ran"] = self.detector_ran
        return d


# --------------------------------------------------------------------------- model loading


def _check_io(session, spec: ModelSpec, source: str) -> tuple[str, bool]:
    """Validate inputs/outputs against the spec; returns (output name, batch dimension is dynamic)."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT:
        raise ModelFileError(source, f"expected one input named {INPUT!r}, found "
                                     f"{[(i.name, i.shape) for i in inputs]}")
    shape = list(inputs[0].shape)
    want = [None, spec.channels, spec.input_size, spec.input_size]
    if len(shape) != 4 or any(isinstance(s, int) and w is not None and s != w for s, w in zip(shape, want)):
        raise ModelFileError(source, f"input {INPUT!r} has shape {shape}; its spec says "
                                     f"[N, {spec.channels}, {spec.input_size}, {spec.input_size}]")
    names = [o.name for o in session.get_outputs()]
    if LANDMARKS in names:
        out = LANDMARKS
    elif HEATMAPS in names and spec.output == "heatmap":
        out = HEATMAPS
    else:
        raise ModelFileError(source, f"expected an output named {LANDMARKS!r} (or {HEATMAPS!r} for a heatmap model "
                                     f"exported without decoding), found {names}")
    oshape = next(o.shape for o in session.get_outputs() if o.name == out)
    if len(oshape) > 1 and isinstance(oshape[1], int) and oshape[1] != spec.num_points:
        raise ModelFileError(source, f"output {out!r} has {oshape[1]} points; its spec says {spec.num_points}")
    batch = shape[0]
    return out, not (isinstance(batch, int) and batch == 1)


# --------------------------------------------------------------------------- the landmarker


def heatmap_confidence(logits: np.ndarray) -> np.ndarray:
    """(N, K, h, w) logits -> (N, K) peak probability of each point's spatial softmax, in float64.

    A sharp single peak scores high, a flat or split map (an occluded or ambiguous point)
    low. It is a relative measure, not a calibrated probability of being right.
    """
    z = np.array(logits, np.float64).reshape(*np.shape(logits)[:2], -1)  # a copy: worked on in place
    z -= z.max(axis=2, keepdims=True)
    np.exp(z, out=z)
    return 1.0 / z.sum(axis=2)


class _Image:
    """One call's image: the caller's pixels as given when they are 3-channel uint8 (BGR or RGB,
    C-contiguous), converted to an RGB copy only when something needs the whole image in RGB
    (a face detector). Model crops are cut from the pixels as given and their channels put in
    the model's order afterwards: `cv2.warpAffine` treats channels alike and independently,
    so the crop is the one cut from the converted image, without converting the whole image
    on every call (0.03 ms at 640x480, 0.44 ms at 1920x1080 on one core, more from a cold cache;
    with an app's boxes or a tracked video frame no detector runs, so no conversion either)."""

    __slots__ = ("pixels", "bgr", "_rgb")

    def __init__(self, pixels: np.ndarray, bgr: bool = False):
        self.pixels, self.bgr, self._rgb = pixels, bgr, None if bgr else pixels

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pixels.shape

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb = cv2.cvtColor(self.pixels, cv2.COLOR_BGR2RGB)
        return self._rgb

    def crop(self, m: np.ndarray, size: int, bgr: bool) -> np.ndarray:
        """The crop `m` describes, channels in BGR order if `bgr`, else RGB (a view, not a copy)."""
        return swap_channels(warp(self.pixels, m, size), "BGR" if bgr else "RGB", "BGR" if self.bgr else "RGB")


def _next_box(points: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The landmark box to crop around on the next pass; the previous one if the points are
    unusable (non-finite, or collapsed to under a pixel as a one-point model's are)."""
    if not np.isfinite(points).all():
        return previous
    b = landmark_box(points)
    return b if min(b[2] - b[0], b[3] - b[1]) >= 1.0 else previous


class FaceLandmarker:
    """Faces and landmarks from images and video frames. Create with `FaceLandmarker.create`.

    Thread-safe: `detect` keeps all per-call state local (onnxruntime's `run` is thread-safe
    and detectors lock themselves); `detect_for_video` runs one frame at a time, under a lock
    (each frame starts from the last one's tracks).
    """

    def __init__(self, session, spec: ModelSpec, options: FaceLandmarkerOptions, source: str = "<session>"):
        options.validate()
        self.session, self.spec, self.options, self.source = session, spec, options, source
        self.output_name, self._dynamic_batch = _check_io(session, spec, source)
        names = [o.name for o in session.get_outputs()]
        self._has_confidence = CONFIDENCE in names
        # a decoded heatmap file from before the `confidence` output: per-point confidence from its heatmaps
        self._extra_heatmaps = (self.output_name == LANDMARKS and HEATMAPS in names
                                and spec.output == "heatmap" and not self._has_confidence)
        # tracking needs a per-point confidence to notice a lost face (`track_quality`)
        self._can_track = self._has_confidence or self._extra_heatmaps or self.output_name == HEATMAPS
        self.crop_rule = options.crop or spec.crop
        self._mean = np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)  # converted once, for to_model_input
        self._std = np.asarray(spec.std, np.float32).reshape(-1, 1, 1)
        # with min_face_size None the detector scans down to the floor; `detect` applies the image's own minimum
        self.detector = make_detector(options.detector, options.min_face_size or MIN_FACE_FLOOR,
                                      options.detector_score, options.nms_iou)
        smoothing = (options.smoothing_min_cutoff, options.smoothing_beta, options.smoothing_d_cutoff)
        self._tracker = FaceTracker(options.track_iou, min_cutoff=options.smoothing_min_cutoff,
                                    beta=options.smoothing_beta, d_cutoff=options.smoothing_d_cutoff)
        self._tracks = LandmarkTracker(options.track_min_quality, options.redetect_interval_ms, options.track_iou,
                                       smoothing)
        self._video_lock = threading.Lock()
        self._last_ts: float | None = None
        self._stream: tuple[int, int, bool] | None = None  # (width, height, gray) of the video's frames

    @classmethod
    def create(cls, model=None, options: FaceLandmarkerOptions | None = None) -> "FaceLandmarker":
        """From the name of a model flm ships (`flm models --shipped`; e.g. "flm-68"), a path to
        an exported flm ONNX file, a ready `onnxruntime.InferenceSession`, or None for the
        default shipped model (`flm.runtime.shipped.DEFAULT_NAME`). A string naming an existing
        file is that file; one without a path separator or `.onnx` suffix that is not a file
        is a name, and an unknown name raises a `UsageError` listing the shipped ones."""
        options = options or FaceLandmarkerOptions()
        if isinstance(model, FaceLandmarkerOptions):  # MediaPipe style: create(options)
            model, options = None, model
        options.validate()
        if model is None or isinstance(model, (str, os.PathLike)):
            path = resolve_model(model)
            session = open_session(path, options.threads, options.providers)
            source = str(path)
        elif all(hasattr(model, a) for a in ("run", "get_inputs", "get_outputs", "get_modelmeta")):
            session, source = model, "<onnxruntime session>"
        else:
            raise UsageError(f"model must be a shipped model's name, a path, an onnxruntime.InferenceSession or "
                             f"None, got {type(model).__name__}", example=f"FaceLandmarker.create({DEFAULT_NAME!r})")
        try:
            return cls(session, read_spec(session, source), options, source)
        except UnicodeDecodeError as e:  # onnxruntime decodes metadata and names as UTF-8
            raise ModelFileError(source, f"not a readable ONNX model (metadata or names are not UTF-8: "
                                         f"{e.reason} at byte {e.start})") from None

    # ------------------------------------------------------------------ inputs

    def _to_image(self, image) -> _Image:
        if isinstance(image, (str, os.PathLike)):
            return _Image(load_image(image))
        if not isinstance(image, np.ndarray):
            raise InvalidInputError(f"image must be a numpy array or a path, got {type(image).__name__}")
        bgr = self.options.color == "BGR"
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size and \
                image.flags.c_contiguous:
            return _Image(image, bgr)  # what to_rgb_uint8 would give, converted only if needed
        try:
            return _Image(to_rgb_uint8(image, "image", bgr=bgr))
        except ValueError as e:
            raise InvalidInputError(str(e)) from None

    @staticmethod
    def _check_boxes(boxes) -> np.ndarray:
        try:
            b = np.asarray(boxes, np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"boxes must be numbers shaped (M, 4) as x0, y0, x1, y1; got {boxes!r}") from None
        if b.size == 0:
            return np.zeros((0, 4))
        if b.ndim == 1 and b.shape[0] == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4:
            raise InvalidInputError(f"boxes must be shaped (M, 4) as x0, y0, x1, y1; got shape {b.shape}")
        if not np.isfinite(b).all() or (b[:, 2] <= b[:, 0]).any() or (b[:, 3] <= b[:, 1]).any():
            raise InvalidInputError(f"boxes must be finite with x1 > x0 and y1 > y0; got {b.tolist()}")
        return b

    # ------------------------------------------------------------------ model

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, S, S) inputs -> ((N, K, 2) points in input pixels, (N, K) confidence or None)."""
        if self._dynamic_batch or len(batch) == 1:
            return self._run_batch(batch)
        parts = [self._run_batch(batch[i:i + 1]) for i in range(len(batch))]
        conf = [p[1] for p in parts]
        return (np.concatenate([p[0] for p in parts]),
                None if conf[0] is None else np.concatenate(conf))

    def _run_batch(self, batch):
        names = [self.output_name] + ([CONFIDENCE] if self._has_confidence else
                                      [HEATMAPS] if self._extra_heatmaps else [])
        outs = self.session.run(names, {INPUT: batch})
        conf = np.asarray(outs[1], np.float64) if self._has_confidence else None
        raw, k = np.asarray(outs[0], np.float64), self.spec.num_points
        # a graph with dynamic output dimensions is only checked against its spec here, on its answer
        if (raw.shape[:2] != (len(batch), k) or raw.ndim != 4) if self.output_name == HEATMAPS else \
                raw.size != len(batch) * k * 2:
            raise ModelFileError(self.source, f"output {self.output_name!r} has shape {list(raw.shape)} for "
                                              f"{len(batch)} face(s); its spec says {k} points")
        if self.output_name == HEATMAPS:
            pts = soft_argmax(raw, self.spec.input_size).astype(np.float64)
            return pts, conf if conf is not None else heatmap_confidence(raw)
        pts = raw.reshape(len(batch), k, 2)
        if self._extra_heatmaps:
            conf = heatmap_confidence(outs[1])
        return pts, conf

    def landmarks_for_boxes(self, rgb, boxes: np.ndarray):
        """Run the model once on crops cut around landmark boxes of an RGB image (pixel
        centres at integers); (points (M, K, 2) image px, confidence (M, K) or None)."""
        image = rgb if isinstance(rgb, _Image) else _Image(rgb)
        s, spec = self.spec.input_size, self.spec
        mats = [crop_matrix(b, self.crop_rule, s) for b in boxes]
        batch = np.empty((len(mats), spec.channels, s, s), np.float32)  # the crops go straight in
        for m, x in zip(mats, batch):
            to_model_input(image.crop(m, s, bgr=spec.color_order == "BGR"), spec.channels, self._mean, self._std, out=x)
        pts_in, conf = self._run(batch)
        pts = np.stack([transform_points(p, invert_affine(m)) for p, m in zip(pts_in, mats)])
        return pts, conf

    def _find_faces(self, image: _Image):
        """The detector's faces big enough for this image, best first: (boxes, scores, landmark boxes)."""
        det, scores = self.detector.detect(image.rgb())
        if not isinstance(self.detector, WholeImageDetector):
            sides = np.minimum(det[:, 2] - det[:, 0], det[:, 3] - det[:, 1])
            big = sides >= min_face_side(self.options.min_face_size, image.shape)
            det, scores = det[big], scores[big]
        return det, scores, self.detector.landmark_boxes(det, image.shape, self.crop_rule)

    def _passes(self, image: _Image, lm_boxes: np.ndarray, passes: int):
        """Run the model `passes` times, each around the landmarks of the one before:
        (points, confidence, landmark boxes of the points)."""
        pts = conf = None
        for _ in range(passes):
            pts, conf = self.landmarks_for_boxes(image, lm_boxes)
            lm_boxes = np.stack([_next_box(p, b) for p, b in zip(pts, lm_boxes)])
        return pts, conf, lm_boxes

    def _face(self, shape, box, score, points, detection_box, confidence, track_id=None) -> Face:
        pose = shape[:2] if (self.options.pose and self.spec.num_points == 68) else None
        return Face(box, float(score), points, detection_box, confidence, track_id, pose_image_shape=pose)

    # ------------------------------------------------------------------ public API

    def detect(self, image, boxes=None) -> FaceLandmarkerResult:
        """Faces and landmarks in one image (numpy array in `options.color` order, or a path).

        With `boxes` ((M, 4) x0, y0, x1, y1 face boxes from the app's own detector) the
        detector is skipped; each box is used as the first landmark box and refined like a
        detector box.
        """
        return self._detect_image(self._to_image(image), boxes)

    def _detect_image(self, image: _Image, boxes=None) -> FaceLandmarkerResult:
        h, w = image.shape[:2]
        result = FaceLandmarkerResult([], (w, h))
        refine = self.options.refine
        if boxes is not None:
            refine = 0 if refine is None else refine  # app boxes: see FaceLandmarkerOptions.refine
            det = self._check_boxes(boxes)
            result.dropped = max(0, len(det) - self.options.max_faces)
            det = det[: self.options.max_faces]
            scores = np.ones(len(det))
            lm_boxes = det.copy()
        else:
            if min(h, w) < MIN_IMAGE_SIDE:
                return result
            det, scores, lm_boxes = self._find_faces(image)
            result.dropped = max(0, len(det) - self.options.max_faces)
            det, scores, lm_boxes = (a[: self.options.max_faces] for a in (det, scores, lm_boxes))
            refine = self.detector.default_refine if refine is None else refine
            result.detector_ran = True
        if len(det) == 0:
            return result
        pts, conf, lm_boxes = self._passes(image, lm_boxes, 1 + refine)
        for i in range(len(det)):
            if not np.isfinite(pts[i]).all():
                log.warning("%s: non-finite landmarks for face %d; dropped", self.source, i)
                continue
            result.faces.append(self._face(image.shape, lm_boxes[i], scores[i], pts[i], det[i],
                                           None if conf is None else conf[i]))
        return result

    def detect_for_video(self, frame, timestamp_ms: float) -> FaceLandmarkerResult:
        """Faces of one video frame, with track ids and One Euro smoothing.

        With `options.tracking` (default) each face is cropped from its landmarks in the frame
        before and the detector runs only when a face is lost or, while fewer than `max_faces`
        are tracked, every `redetect_interval_ms` (see `flm.runtime.tracking`); without it,
        `detect` runs on every frame. Faces keep their `track_id` while followed; ids restart
        at 0 after `reset_video()`.

        One stream at a time: `timestamp_ms` must increase, and every frame must have the first
        one's size and be colour (H x W x 3/4) if it was, gray (H x W or H x W x 1) if it was.
        A frame breaking these rules raises `InvalidInputError` and changes nothing, so the
        stream can go on; call `reset_video()` before frames of another stream.
        """
        ts = self._timestamp(timestamp_ms)
        gray = isinstance(frame, np.ndarray) and (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1))
        image = self._to_image(frame)
        with self._video_lock:
            self._check_stream(ts, image.shape, gray)
            if self.options.tracking and self._can_track:
                result = self._track_frame(image, ts)
            else:
                result = self._match_frame(image, ts)
            self._last_ts, self._stream = ts, (image.shape[1], image.shape[0], gray)
        result.timestamp_ms = ts
        return result

    def _timestamp(self, timestamp_ms) -> float:
        try:
            ts = float(timestamp_ms)
        except (TypeError, ValueError):
            raise InvalidInputError(f"timestamp_ms must be a number, got {timestamp_ms!r}") from None
        if not np.isfinite(ts):
            raise InvalidInputError(f"timestamp_ms must be finite, got {ts}")
        return ts

    def _check_stream(self, ts: float, shape, gray: bool) -> None:
        if self._last_ts is not None and ts <= self._last_ts:
            raise InvalidInputError(f"timestamp_ms must increase from frame to frame: got {ts} after {self._last_ts}")
        if self._stream is None:
            return
        w, h, was_gray = self._stream
        if (shape[1], shape[0]) != (w, h):
            raise InvalidInputError(f"frame is {shape[1]}x{shape[0]} but this video's frames are {w}x{h}; "
                                    "call reset_video() before the frames of another video")
        if gray != was_gray:
            kinds = ("grayscale", "colour") if gray else ("colour", "grayscale")
            raise InvalidInputError(f"frame is {kinds[0]} but this video's frames are {kinds[1]}; "
                                    "call reset_video() before the frames of another video")

    def _match_frame(self, image: _Image, ts: float) -> FaceLandmarkerResult:
        """Tracking off: `detect`, then match the faces to the last frame's by IoU and smooth."""
        result = self._detect_image(image)
        ids, smoothed = self._tracker.update([f.box for f in result.faces],
                                             [f.landmarks for f in result.faces], ts / 1000.0)
        for i, (face, tid) in enumerate(zip(result.faces, ids)):
            pts = smoothed[i] if self.options.smoothing else face.landmarks
            result.faces[i] = self._face(image.shape, _next_box(pts, face.box), face.score, pts,
                                         face.detection_box, face.confidence, tid)
        return result

    def _track_frame(self, image: _Image, ts: float) -> FaceLandmarkerResult:
        """Tracking on: follow the tracks, run the detector if one was lost or it is due."""
        tracker, (h, w) = self._tracks, image.shape[:2]
        result = FaceLandmarkerResult([], (w, h))
        if min(h, w) < MIN_IMAGE_SIDE:
            return result
        kept, lost = self._follow(image, ts / 1000.0)
        if lost or tracker.detection_due(ts, self.options.max_faces):
            kept += self._pick_up(image, kept, lost, ts / 1000.0)
            tracker.last_detection_ms, result.detector_ran = ts, True
        tracker.tracks = tracker.without_duplicates(kept, self.options.nms_iou)
        result.dropped = tracker.dropped
        for t in tracker.tracks:
            pts = tracker.smooth(t, t.points, ts / 1000.0) if self.options.smoothing else t.points
            result.faces.append(self._face(image.shape, _next_box(pts, t.box), t.score, pts, t.detection_box,
                                           t.confidence, t.id))
        return result

    def _follow(self, image: _Image, t_s: float) -> tuple[list[LandmarkTrack], list[LandmarkTrack]]:
        """Run the model once on each track's crop (its last landmark box moved on by its
        velocity, `LandmarkTracker.predicted_box`): (healthy tracks, lost tracks)."""
        tracks = self._tracks.tracks
        if not tracks:
            return [], []
        crops = np.stack([self._tracks.predicted_box(t, t_s) for t in tracks])
        pts, conf = self.landmarks_for_boxes(image, crops)
        kept, lost = [], []
        for i, t in enumerate(tracks):
            c = None if conf is None else conf[i]
            box = _next_box(pts[i], crops[i])
            t.quality = track_quality(c, box, image.shape) if np.isfinite(pts[i]).all() else 0.0
            if self._tracks.healthy(t.quality):
                self._tracks.moved(t, box, t_s)
                t.points, t.confidence = pts[i], c
                kept.append(t)
            else:
                lost.append(t)
        return kept, lost

    def _pick_up(self, image: _Image, kept: list[LandmarkTrack], lost: list[LandmarkTrack],
                 t_s: float) -> list[LandmarkTrack]:
        """Run the detector: tracks for the faces no healthy track follows (a lost track a face
        overlaps is resumed; lost tracks left over end), at most `max_faces` in all."""
        tracker = self._tracks
        det, scores, lm_boxes = self._find_faces(image)
        if kept and len(det):
            free = box_iou(lm_boxes, np.stack([t.box for t in kept])).max(axis=1) <= tracker.iou
            det, scores, lm_boxes = det[free], scores[free], lm_boxes[free]
        room = self.options.max_faces - len(kept)
        tracker.dropped = max(0, len(det) - room)
        det, scores, lm_boxes = det[:room], scores[:room], lm_boxes[:room]
        if not len(det):
            return []
        refine = self.detector.default_refine if self.options.refine is None else self.options.refine
        pts, conf, lm_boxes = self._passes(image, lm_boxes, 1 + refine)
        found = []
        for i in range(len(det)):
            if not np.isfinite(pts[i]).all():
                continue
            c = None if conf is None else conf[i]
            t = tracker.start(lm_boxes[i], det[i], scores[i], track_quality(c, lm_boxes[i], image.shape), lost, t_s)
            t.points, t.confidence = pts[i], c
            found.append(t)
        return found

    def reset_video(self) -> None:
        """Forget tracks, the last timestamp and the frame size (start of a new video)."""
        with self._video_lock:
            self._tracker.reset()
            self._tracks.reset()
            self._last_ts = self._stream = None

    def __repr__(self) -> str:
        return (f"FaceLandmarker({self.source!r}, {self.spec.preset}, {self.spec.num_points} points, "
                f"{self.spec.input_size}px, detector={self.detector.describe()})")
