"""Face detectors behind one interface, plus the box maths they share (IoU, NMS).

A detector answers "where are the faces?" with boxes and scores. Its boxes are *not* the
boxes an flm model was trained on: training crops are cut around the tight box of the
landmarks (`flm.spec.CropRule`, source "landmark-box"), and each detector frames a face its
own way (Haar's box starts at the brows and ends above the chin, YuNet's includes the
forehead). So every detector carries a `BoxAdjust`, a fixed affine map from its box to the
expected landmark box, measured once on annotated faces with `calibrate_box_adjust`. The
landmarker then refines the crop with a second pass around the landmarks it found, so the
adjustment only has to be close, not exact.

Backends:
- `HaarDetector`: OpenCV's frontal-face Haar cascade (ships inside opencv-python < 5).
- `YuNetDetector`: `cv2.FaceDetectorYN` with a YuNet ONNX file the user gives.
- `WholeImageDetector`: "the whole image is the face", for pre-cropped input.

OpenCV's detector objects keep per-call state, so each backend serialises its own calls with
a lock; a `FaceLandmarker` shared by threads stays correct (the landmark model itself runs
in parallel).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flm.errors import ModelFileError, UsageError
from flm.spec import CropRule

# --------------------------------------------------------------------------- box maths


def box_iou(a, b) -> np.ndarray:
    """(M, N) intersection-over-union of (M, 4) and (N, 4) (x0, y0, x1, y1) boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes, scores, iou_threshold: float = 0.4, max_keep: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds
    `iou_threshold`. Ties in score keep the earlier box.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


# --------------------------------------------------------------------------- detector box -> landmark box


@dataclass(frozen=True)
class BoxAdjust:
    """Map a detector box to the expected tight landmark box.

    The landmark box centre is the detector box centre moved by (`dx` * w, `dy` * h); its
    width and height are `sw` * w and `sh` * h. The identity adjust means "this box already
    is a landmark box" (boxes an app passes to `detect(boxes=...)`).
    """

    dx: float = 0.0
    dy: float = 0.0
    sw: float = 1.0
    sh: float = 1.0

    def apply(self, boxes) -> np.ndarray:
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        cx = (b[:, 0] + b[:, 2]) / 2 + self.dx * w
        cy = (b[:, 1] + b[:, 3]) / 2 + self.dy * h
        hw, hh = self.sw * w / 2, self.sh * h / 2
        return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)


def calibrate_box_adjust(detector_boxes, landmark_boxes) -> BoxAdjust:
    """The median `BoxAdjust` taking each detector box to its matching landmark box.

    How the constants below are measured (`python benchmarks/defaults.py`, which also measures
    the refine defaults): run the detector on annotated *training* faces (400 from the training
    part of ../shared/data/youtube-faces-68 and 400 from that of 300w-train, split as `flm train
    --val split` splits them; each image padded by 30 % with gray so the face is not cut by the
    image border), match each ground-truth landmark box to the detection with the highest IoU
    (> 0.2), and take medians (robust to the odd mismatched face).
    """
    d = np.asarray(detector_boxes, np.float64).reshape(-1, 4)
    g = np.asarray(landmark_boxes, np.float64).reshape(-1, 4)
    if len(d) == 0 or len(d) != len(g):
        raise ValueError(f"calibrate_box_adjust: need matching non-empty box lists, got {len(d)} and {len(g)}")
    w, h = d[:, 2] - d[:, 0], d[:, 3] - d[:, 1]
    dx = ((g[:, 0] + g[:, 2]) - (d[:, 0] + d[:, 2])) / 2 / w
    dy = ((g[:, 1] + g[:, 3]) - (d[:, 1] + d[:, 3])) / 2 / h
    sw, sh = (g[:, 2] - g[:, 0]) / w, (g[:, 3] - g[:, 1]) / h
    return BoxAdjust(*(round(float(np.median(v)), 3) for v in (dx, dy, sw, sh)))


# --------------------------------------------------------------------------- detectors


class FaceDetector:
    """Base class: `detect(rgb)` -> (boxes (M, 4) float64, scores (M,)), best first.

    Subclasses implement `_raw(rgb)`; the base class applies the minimum size, the score
    threshold and NMS the same way for every backend. Scores are each backend's own
    confidence in [0, 1] and are not calibrated against each other.
    """

    name = "base"
    adjust = BoxAdjust()
    default_score_threshold = 0.5
    default_refine = 1  # extra landmark passes when FaceLandmarkerOptions.refine is None

    def __init__(self, min_size: int = 40, score_threshold: float | None = None, nms_iou: float = 0.4,
                 adjust: BoxAdjust | None = None):
        if min_size < 1:
            raise UsageError(f"min_face_size must be >= 1 pixel, got {min_size}",
                             example="FaceLandmarkerOptions(min_face_size=40)")
        self.min_size = int(min_size)
        self.score_threshold = self.default_score_threshold if score_threshold is None else float(score_threshold)
        self.nms_iou = float(nms_iou)
        if adjust is not None:  # e.g. constants refitted by benchmarks/defaults.py; default: the class's
            if not isinstance(adjust, BoxAdjust):
                raise UsageError(f"adjust must be a BoxAdjust, got {adjust!r}",
                                 example="HaarDetector(adjust=BoxAdjust(dx=0.0, dy=0.155, sw=0.845, sh=0.818))")
            self.adjust = adjust
        self._lock = threading.Lock()

    def _raw(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            boxes, scores = self._raw(rgb)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        ok = ((np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_size)
              & (scores >= self.score_threshold) & np.isfinite(boxes).all(axis=1))
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, self.nms_iou)
        return boxes[keep], scores[keep]

    def landmark_boxes(self, boxes, image_shape, rule: CropRule) -> np.ndarray:
        """Detector boxes -> the landmark boxes the model's crop rule expects."""
        return self.adjust.apply(boxes)

    def describe(self) -> str:
        return self.name


class HaarDetector(FaceDetector):
    """OpenCV's `haarcascade_frontalface_default.xml` on the equalised gray image.

    Score: n / (n + 5) where n is the number of overlapping raw detections OpenCV merged
    into the box (a monotone confidence, not a probability); boxes need n >= `min_neighbors`.
    Haar's square box spans from above the brows to below the lower lip and reaches past the
    cheeks; the landmark box is narrower (0.84 w), shorter (0.82 h) and sits lower (+0.153 h).
    """

    name = "haar"
    # Fitted by benchmarks/defaults.py on training faces only (400 of youtube-faces-68's and 400
    # of 300w-train's training part, see calibrate_box_adjust): 655 of 800 found; median IoU with
    # the landmark box 0.57 raw -> 0.76 adjusted.
    adjust = BoxAdjust(dx=0.001, dy=0.153, sw=0.843, sh=0.819)
    # A Haar box is rough even adjusted: each pass helps (one model run, ~7-19 ms, next to 15-110 ms
    # of Haar). benchmarks/defaults.py, flm-68, mean NME over youtube / 300w held-out and aflw2000-3d-val,
    # refine 0 / 1 / 2: 6.22 / 5.71 / 5.52 % (see FaceLandmarkerOptions.refine).
    default_refine = 2
    default_score_threshold = 0.0

    def __init__(self, min_size: int = 40, score_threshold: float | None = None, nms_iou: float = 0.4,
                 cascade: str | None = None, min_neighbors: int = 5, scale_factor: float = 1.1,
                 adjust: BoxAdjust | None = None):
        super().__init__(min_size, score_threshold, nms_iou, adjust)
        path = cascade or (cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if not Path(path).is_file():
            raise ModelFileError(path, "Haar cascade file not found (it ships with opencv-python < 5; "
                                       "reinstall opencv-python-headless or pass detector='yunet:PATH')")
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ModelFileError(path, "OpenCV could not load this Haar cascade")
        self.min_neighbors, self.scale_factor = int(min_neighbors), float(scale_factor)

    # The cascade's cost grows with the pixel count (a 4000x4000 frame took 10 s), so larger
    # images are scanned at this longer side, as YuNet's are; the smallest face found in such an
    # image is then 24 / scale pixels (the cascade's window), e.g. 150 px in an 8000 px frame.
    max_side = 1280

    def _raw(self, rgb):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        k = min(1.0, self.max_side / max(gray.shape))
        if k < 1.0:
            gray = cv2.resize(gray, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
        min_side = max(24, int(round(self.min_size * k)))  # 24 px: the cascade's own window
        rects, counts = self._cascade.detectMultiScale2(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(min_side, min_side))
        if len(rects) == 0:
            return np.zeros((0, 4)), np.zeros(0)
        r = np.asarray(rects, np.float64).reshape(-1, 4)
        n = np.asarray(counts, np.float64).reshape(-1)
        boxes = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1) / k
        return boxes, n / (n + 5.0)


class YuNetDetector(FaceDetector):
    """YuNet through `cv2.FaceDetectorYN`, from an ONNX file the user gives.

    Images are scaled so the longer side is at most `max_side` before detection (YuNet's
    cost grows with the pixel count); boxes are scaled back. Score: YuNet's face score.
    """

    name = "yunet"
    # Fitted by benchmarks/defaults.py on training faces only (400 of youtube-faces-68's and 400
    # of 300w-train's training part, see calibrate_box_adjust): 800 of 800 found; median IoU with
    # the landmark box 0.69 raw -> 0.88 adjusted.
    adjust = BoxAdjust(dx=0.004, dy=0.129, sw=1.056, sh=0.757)
    default_score_threshold = 0.6
    # benchmarks/defaults.py, flm-68-distilled, mean NME over the three validation sets, refine
    # 0 / 1 / 2: 4.53 / 4.45 / 4.47 % — one pass lowest, by 0.02 % (two with d3, the default's
    # previous last stage: 4.56 / 4.48 / 4.46; see FaceLandmarkerOptions.refine).
    default_refine = 1

    def __init__(self, model_path, min_size: int = 40, score_threshold: float | None = None,
                 nms_iou: float = 0.4, max_side: int = 640, adjust: BoxAdjust | None = None):
        super().__init__(min_size, score_threshold, nms_iou, adjust)
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "YuNet model file not found")
        try:
            # the detector's own threshold stays low: the base class applies ours after NMS
            self._det = cv2.FaceDetectorYN.create(str(self.path), "", (320, 320), 0.3, 0.3, 5000)
        except cv2.error as e:
            raise ModelFileError(self.path, f"cv2.FaceDetectorYN cannot load it as a YuNet model "
                                            f"({str(e).strip().splitlines()[-1][:160]})") from None
        self.max_side = int(max_side)

    def _raw(self, rgb):
        h, w = rgb.shape[:2]
        k = min(1.0, self.max_side / max(h, w))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if k < 1.0:
            bgr = cv2.resize(bgr, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
        self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._det.detect(bgr)
        if faces is None or len(faces) == 0:
            return np.zeros((0, 4)), np.zeros(0)
        f = np.asarray(faces, np.float64)
        sx, sy = w / bgr.shape[1], h / bgr.shape[0]
        boxes = np.stack([f[:, 0] * sx, f[:, 1] * sy, (f[:, 0] + f[:, 2]) * sx, (f[:, 1] + f[:, 3]) * sy], axis=1)
        return boxes, f[:, -1]

    def describe(self) -> str:
        return f"yunet:{self.path}"


class WholeImageDetector(FaceDetector):
    """The whole image is one face (pre-cropped input): score 1, no NMS, no minimum size.

    The landmark box is chosen so that the model's first crop is exactly the image (for a
    square image), i.e. a face framed the way the model's crops frame faces is read as is.
    """

    name = "none"

    def __init__(self, *args, **kwargs):
        super().__init__(1, 0.0, 1.0)

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        return np.array([[0.0, 0.0, w - 1.0, h - 1.0]]), np.ones(1)

    def landmark_boxes(self, boxes, image_shape, rule: CropRule) -> np.ndarray:
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        lw, lh = w / rule.scale, h / rule.scale
        cx = (b[:, 0] + b[:, 2]) / 2
        cy = (b[:, 1] + b[:, 3]) / 2 - rule.shift_y * lh  # the crop rule moves the centre back down
        return np.stack([cx - lw / 2, cy - lh / 2, cx + lw / 2, cy + lh / 2], axis=1)


DETECTOR_EXAMPLE = "--detector haar   (or yunet:PATH/TO/yunet.onnx, or none)"


def make_detector(spec, min_size: int = 40, score_threshold: float | None = None,
                  nms_iou: float = 0.4) -> FaceDetector:
    """A detector from 'haar', 'yunet:PATH', 'none', or a ready `FaceDetector` (returned as is)."""
    if isinstance(spec, FaceDetector):
        return spec
    if not isinstance(spec, str):
        raise UsageError(f"detector must be 'haar', 'yunet:PATH', 'none' or a FaceDetector, got {spec!r}",
                         example=DETECTOR_EXAMPLE)
    name, _, arg = spec.partition(":")
    if name == "haar":
        return HaarDetector(min_size, score_threshold, nms_iou, cascade=arg or None)
    if name == "yunet":
        if not arg:
            raise UsageError(f"detector {spec!r}: YuNet needs the path of its ONNX file after the colon",
                             example="--detector yunet:models/face_detection_yunet_2023mar.onnx")
        return YuNetDetector(arg, min_size, score_threshold, nms_iou)
    if name == "none" and not arg:
        return WholeImageDetector()
    raise UsageError(f"unknown detector {spec!r}", example=DETECTOR_EXAMPLE)
