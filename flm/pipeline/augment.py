"""Landmark-consistent augmentation: every geometric change moves the points with the pixels.

Geometry is one affine per sample (box jitter, scale, rotation, shift, flip) built by
`flm.geometry.crop_matrix` — the same function the runtime uses to cut its crops — so
training crops and runtime crops can never drift apart. Photometric changes act on pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from flm.geometry import crop_matrix, flip_permutation, landmark_box, transform_points, warp
from flm.spec import ModelSpec


@dataclass(frozen=True)
class AugmentConfig:
    box_jitter: float = 0.05  # each box edge moves by up to this fraction of the box size
    scale: float = 0.10  # zoom in [1 - s, 1 + s]
    rotation: float = 20.0  # degrees, uniform in [-r, r]
    shift: float = 0.04  # crop centre moves by up to this fraction of the crop side
    flip: float = 0.5
    color: float = 0.3  # brightness / contrast / saturation jitter strength
    grayscale: float = 0.1
    erase: float = 0.2  # probability of one random occluding rectangle
    noise: float = 0.2  # probability of Gaussian noise
    blur: float = 0.2  # probability of a Gaussian blur

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def scaled(self, strength: float, crop: float = 1.0) -> "AugmentConfig":
        """Rotation and the photometric changes times `strength`, crop jitter times `crop`.

        0 = none, 1 = these defaults. Light augmentation for a last few epochs lets an
        underfitting model fit the clean crops it is evaluated on. The crop jitter (box, scale,
        shift) has its own factor because it stands for the error of a face detector's box, which
        the runtime meets: weakening it helps the ground-truth-box benchmark and can hurt end to
        end (see the model card). The flip is a separate choice because it depends on the labels.
        """
        def factor(k):
            return 1.0 if k == "flip" else crop if k in _CROP else strength

        return AugmentConfig(**{k: min(v * factor(k), 1.0) if k in _PROBABILITIES else v * factor(k)
                                for k, v in vars(self).items()})


_CROP = {"box_jitter", "scale", "shift"}
_PROBABILITIES = {"grayscale", "erase", "noise", "blur"}


def make_crop(image: np.ndarray, points: np.ndarray, spec: ModelSpec, rng: np.random.Generator | None,
              aug: AugmentConfig | None, box=None):
    """Cut the model-input crop from an RGB image; returns (crop uint8, points in crop pixels).

    With `aug=None` this is the deterministic evaluation crop around the landmark box.
    """
    box = landmark_box(points) if box is None else np.asarray(box, np.float64)
    size = spec.input_size
    if aug is None or rng is None:
        m = crop_matrix(box, spec.crop, size)
        return warp(image, m, size), transform_points(points, m).astype(np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    box = box + rng.uniform(-aug.box_jitter, aug.box_jitter, 4) * np.array([w, h, w, h])
    flip = rng.random() < aug.flip
    m = crop_matrix(box, spec.crop, size, angle_deg=rng.uniform(-aug.rotation, aug.rotation),
                    scale=rng.uniform(1 - aug.scale, 1 + aug.scale),
                    shift=tuple(rng.uniform(-aug.shift, aug.shift, 2)), flip=flip)
    crop = warp(image, m, size)
    pts = transform_points(points, m)
    if flip:
        pts = pts[flip_permutation(spec.scheme)]
    return photometric(crop, rng, aug), pts.astype(np.float32)


def photometric(crop: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    img = crop.astype(np.float32)
    if aug.color:
        c = aug.color
        img = img * rng.uniform(1 - c, 1 + c) + rng.uniform(-c, c) * 64  # contrast, brightness
        gray = img.mean(axis=2, keepdims=True)
        img = gray + (img - gray) * rng.uniform(1 - c, 1 + c)  # saturation
    if rng.random() < aug.grayscale:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    if rng.random() < aug.blur:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.5))
    if rng.random() < aug.noise:
        img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
    if rng.random() < aug.erase:
        s = img.shape[0]
        eh, ew = (rng.uniform(0.1, 0.4, 2) * s).astype(int)
        y, x = rng.integers(0, s - eh), rng.integers(0, s - ew)
        img[y:y + eh, x:x + ew] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)
