"""Augmentation keeps points on their pixels, including flips with the index permutation."""

from dataclasses import replace

import numpy as np

from flm.geometry import flip_permutation
from flm.pipeline.augment import AugmentConfig, make_crop
from flm.pipeline.models import PRESETS
from tests.test_geometry import dot_image

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
