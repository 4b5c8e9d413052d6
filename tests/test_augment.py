"""Augmentation keeps points on their pixels, including flips with the index permutation."""

from dataclasses import replace

import cv2
import numpy as np
import pytest

from flm.geometry import flip_permutation
from flm.pipeline.augment import AugmentConfig, make_crop
from flm.pipeline.models import PRESETS

from tests.helpers.data import dot_image

SPEC = PRESETS["shufflenet-heatmap"].spec.with_(input_size=160, heatmap_size=20)


def grid68():
    xs, ys = np.meshgrid(np.arange(17) * 11 + 40, np.arange(4) * 22 + 60)
    return np.stack([xs, ys], -1).reshape(-1, 2).astype(float)  # 68 well-separated points


def check_dots(crop, cpts, owner):
    for i, (x, y) in enumerate(np.round(cpts).astype(int)):
        j = owner[i]
        assert tuple(crop[y, x]) == (40 + 3 * j, 255 - 3 * j, 128), f"point {i} is not on dot {j}"


def test_geometric_augmentation_moves_points_with_pixels():
    pts = grid68()
    img = dot_image(pts, (300, 200))
    geo = replace(AugmentConfig.off(), box_jitter=0.05, scale=0.1, rotation=25, shift=0.03)
    for seed in range(5):
        crop, cpts = make_crop(img, pts, SPEC, np.random.default_rng(seed), geo)
        check_dots(crop, cpts, np.arange(68))


def test_flip_relabels_points_with_the_permutation():
    pts = grid68()
    img = dot_image(pts, (300, 200))
    flip = replace(AugmentConfig.off(), flip=1.0)
    crop, cpts = make_crop(img, pts, SPEC, np.random.default_rng(0), flip)
    perm = flip_permutation("ibug68")
    check_dots(crop, cpts, perm)  # point i now sits on the dot of original point perm[i]
    # negative control: without relabelling the points would be on the wrong dots
    try:
        check_dots(crop, cpts, np.arange(68))
    except AssertionError:
        pass
    else:
        raise AssertionError("flip check is vacuous")
    # the left outer eye corner (36) of the flipped face is left of the right one (45)
    assert pts[36, 0] < pts[45, 0] and cpts[36, 0] < cpts[45, 0]


def test_flip_shift_keeps_offset_labels_on_their_side_of_the_features():
    """A set whose labels sit `o` px right of the features (youtube-faces-68, 300w-train: model card)
    keeps them `o` px right of the mirrored features with flip_shift=o; a plain flip moves them left."""
    pts, o = grid68(), 4.0
    img, labels = dot_image(pts, (300, 200)), pts + [o, 0]
    perm = flip_permutation("ibug68")
    for shift, side in ((o, 1), (0.0, -1)):
        aug = replace(AugmentConfig.off(), flip=1.0, flip_shift=shift)
        crop, cpts = make_crop(img, labels, SPEC, np.random.default_rng(0), aug)
        k = (cpts[16, 0] - cpts[0, 0]) / (pts[16, 0] - pts[0, 0])  # crop pixels per image pixel
        check_dots(crop, cpts - [side * o * k, 0], perm)
        with pytest.raises(AssertionError):  # negative control: the other side is off the dots
            check_dots(crop, cpts + [side * o * k, 0], perm)


def test_photometric_changes_pixels_not_points():
    pts = grid68()
    img = dot_image(pts, (300, 200))
    base_crop, base_pts = make_crop(img, pts, SPEC, None, None)
    crop, cpts = make_crop(img, pts, SPEC, np.random.default_rng(3),
                           replace(AugmentConfig.off(), color=0.4, noise=1.0, blur=1.0, erase=1.0))
    np.testing.assert_array_equal(cpts, base_pts)
    assert np.abs(crop.astype(int) - base_crop).mean() > 1


def test_strength_scales_rotation_and_appearance_but_keeps_crop_jitter_and_flip():
    base = AugmentConfig()
    assert base.scaled(1.0) == base
    half = base.scaled(0.5)
    assert half.rotation == base.rotation / 2 and half.erase == base.erase / 2 and half.color == base.color / 2
    kept = ("flip", "box_jitter", "scale", "shift")
    assert all(getattr(half, k) == getattr(base, k) for k in kept)
    assert base.scaled(0.0) == replace(AugmentConfig.off(), **{k: getattr(base, k) for k in kept})
    assert base.scaled(10.0).erase == 1.0  # probabilities stay probabilities
    assert base.scaled(1.0, crop=0.5).box_jitter == base.box_jitter / 2 and base.scaled(0.0, crop=0.0) == \
        replace(AugmentConfig.off(), flip=base.flip)
    # weaker rotation turns the crop less: mean point displacement from the clean crop
    pts = grid68()
    img = dot_image(pts, (300, 200))
    _, clean = make_crop(img, pts, SPEC, None, None)
    no_crop_jitter = replace(base, flip=0, box_jitter=0, scale=0, shift=0)

    def moved(cfg):
        return np.mean([np.abs(make_crop(img, pts, SPEC, np.random.default_rng(s), cfg)[1] - clean).mean()
                        for s in range(20)])

    assert moved(no_crop_jitter.scaled(0.0)) < 1e-3 < moved(no_crop_jitter.scaled(0.3)) < moved(no_crop_jitter)


# --------------------------------------------------------------------------- out-of-plane turns


def _dotted_face(seed=0):
    """A 400 x 400 picture of a frontal face (flm's 3-D mean face) with a dot of its own colour on
    each landmark: after a turn, a point that stayed on its feature sits on its own colour."""
    from flm.pipeline.augment import _template
    pts = _template()[:68, :2] * 110 + [200, 190]
    img = np.full((400, 400, 3), 40, np.uint8)
    colours = np.random.default_rng(seed).integers(60, 256, (68, 3))
    for p, c in zip(pts, colours):
        cv2.circle(img, tuple(int(round(v)) for v in p), 3, tuple(int(v) for v in c), -1)
    return img, pts, colours


def _on_own_colour(img, pts, colours, which) -> float:
    hits = [np.abs(img[int(round(pts[i, 1])), int(round(pts[i, 0]))].astype(int) - colours[i]).max() <= 12
            for i in which]
    return float(np.mean(hits))


@pytest.mark.parametrize("yaw, pitch", [(30, 0), (-30, 0), (20, 12), (45, 0)])
def test_turned_points_stay_on_the_warped_features(yaw, pitch):
    from flm.pipeline.augment import turn_face
    img, pts, colours = _dotted_face()
    out, turned = turn_face(img, pts, yaw, pitch)
    # eyes, brows, mouth and the nose bridge (the far jaw may be hidden), whose dots do not overlap
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2) + np.eye(68) * 99
    inner = [i for i in list(range(17, 31)) + list(range(36, 68)) if d[i].min() > 8]
    assert len(inner) >= 30
    assert _on_own_colour(out, turned, colours, inner) >= 0.9
    moved = np.linalg.norm(turned - pts, axis=1)
    assert np.median(moved[inner]) > 5  # the face did turn
    # negative control: the points where they were before the turn are no longer on their dots
    assert _on_own_colour(out, pts.astype(np.float32), colours, inner) < 0.5
    # the nose tip moves towards the turn, the far cheek towards the middle (x right, yaw > 0 turns right)
    assert np.sign(turned[30, 0] - pts[30, 0]) == np.sign(yaw)


def test_no_turn_changes_nothing_and_the_background_stays():
    from flm.pipeline.augment import turn_face
    img, pts, _ = _dotted_face()
    out, same = turn_face(img, pts, 0.0, 0.0)
    np.testing.assert_allclose(same, pts, atol=1e-3)
    assert np.abs(out.astype(int) - img).max() <= 1
    turned, _ = turn_face(img, pts, 40.0)
    assert (turned[:20, :20] == img[:20, :20]).all()  # the corners are anchored


def test_pose_augmentation_runs_inside_make_crop_and_keeps_points_in_the_crop():
    from flm.pipeline.augment import make_crop
    from flm.pipeline.models import build_model
    img, pts, _ = _dotted_face()
    spec = build_model("shufflenet-heatmap", 128).spec
    aug = AugmentConfig.from_options(0, 0, 0, pose=1.0, pose_yaw=60)
    crops = [make_crop(img, pts, spec, np.random.default_rng(k), aug) for k in range(6)]
    for crop, cpts in crops:
        assert crop.shape == (128, 128, 3) and (cpts >= 0).all() and (cpts < 128).all()
    spread = np.std([c[1][30, 0] for c in crops])
    assert spread > 2  # different turns per draw, not the same crop six times
