"""Pure pre/post-processing shared by training and the runtime."""

import cv2
import numpy as np
import pytest

from flm.geometry import (crop_matrix, flip_permutation, gaussian_heatmaps, invert_affine, landmark_box,
                          nme, nme_summary, normaliser, soft_argmax, transform_points, warp)
from flm.spec import SCHEMES, CropRule, ModelSpec

from tests.helpers.data import dot_image


def test_crop_maps_points_onto_their_pixels():
    # a 5x4 grid of dots, far enough apart that interpolation cannot mix them
    pts = np.stack(np.meshgrid(np.arange(60, 161, 25), np.arange(60, 136, 25)), -1).reshape(-1, 2).astype(float)
    img = dot_image(pts)
    m = crop_matrix(landmark_box(pts), CropRule(scale=1.8), 128, angle_deg=25, scale=1.1, shift=(0.03, -0.02))
    crop = warp(img, m, 128)
    cpts = transform_points(pts, m)
    for i, (x, y) in enumerate(np.round(cpts).astype(int)):
        assert tuple(crop[y, x]) == (40 + 3 * i, 255 - 3 * i, 128), f"point {i} landed off its dot"


def test_crop_inverse_round_trip():
    m = crop_matrix([10, 20, 110, 140], CropRule(), 96, angle_deg=-12, flip=True)
    pts = np.array([[30.5, 40.25], [100.0, 130.0]])
    back = transform_points(transform_points(pts, m), invert_affine(m))
    np.testing.assert_allclose(back, pts, atol=1e-9)


def test_default_crop_centres_the_box():
    m = crop_matrix([0, 0, 99, 99], CropRule(scale=1.0), 100)
    np.testing.assert_allclose(transform_points(np.array([[49.5, 49.5]]), m), [[49.5, 49.5]], atol=1e-9)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_flip_permutation_is_an_involution(scheme):
    perm = flip_permutation(scheme)
    assert sorted(perm) == list(range(SCHEMES[scheme]["points"]))
    np.testing.assert_array_equal(perm[perm], np.arange(len(perm)))
    a, b = SCHEMES[scheme]["outer_eyes"]
    assert perm[a] == b


def test_ibug68_flip_fixes_exactly_the_midline():
    perm = flip_permutation("ibug68")
    fixed = set(np.flatnonzero(perm == np.arange(68)).tolist())
    assert fixed == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    # jaw end to jaw end, left brow outer to right brow outer, mouth corners
    assert perm[0] == 16 and perm[17] == 26 and perm[48] == 54 and perm[36] == 45 and perm[39] == 42


@pytest.mark.parametrize("hm,size", [(16, 128), (20, 160), (32, 128)])
def test_heatmap_encode_decode_is_sub_pixel(hm, size):
    rng = np.random.default_rng(1)
    stride = size / hm
    pts = rng.uniform(4 * stride, size - 4 * stride, (68, 2))
    maps = gaussian_heatmaps(pts, hm, size, sigma=1.0)
    dec = soft_argmax(np.log(maps[None] + 1e-30), size)[0]
    assert np.abs(dec - pts).max() < 0.01
    # argmax alone would quantise to the stride: the decode must do much better than that
    am = np.array(np.unravel_index(maps.reshape(68, -1).argmax(1), (hm, hm)))[::-1].T
    assert np.abs((am + 0.5) * stride - 0.5 - pts).max() > 10 * np.abs(dec - pts).max()


def test_soft_argmax_matches_torch_twin():
    torch = pytest.importorskip("torch")
    from flm.pipeline.models import soft_argmax as torch_soft_argmax
    logits = np.random.default_rng(2).normal(0, 3, (2, 5, 16, 16)).astype(np.float32)
    a = soft_argmax(logits, 128)
    b = torch_soft_argmax(torch.from_numpy(logits), 128).numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_nme_and_summary():
    gt = np.zeros((2, 68, 2))
    gt[:, 36] = [0, 0]
    gt[:, 45] = [100, 0]
    pred = gt.copy()
    pred[1] += 3.0  # every point 3*sqrt(2) px off -> NME 4.24 %
    e = nme(pred, gt, normaliser(gt, "inter-ocular", "ibug68"))
    np.testing.assert_allclose(e, [0, 3 * np.sqrt(2) / 100])
    s = nme_summary(e, 0.08)
    assert s["failure_rate"] == 0 and 0.5 < s["auc"] < 1
    assert nme_summary(np.array([0.5]), 0.08)["auc"] == 0
    # 9 % fails at 8 % but not at 10 %; its AUC share is 1 - 0.09 / 0.10 there
    s9 = nme_summary(np.array([0.09]), 0.08)
    assert (s9["failure_rate"], s9["failure_rate_10"]) == (1.0, 0.0)
    assert s9["auc"] == 0 and s9["auc_10"] == pytest.approx(0.1, abs=2e-3)


def test_spec_round_trip_and_refusal():
    from flm.errors import SpecError
    spec = ModelSpec("p", 68, "ibug68", 128, 3, "RGB", (0.5,) * 3, (0.2,) * 3, "heatmap", 16)
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="lacks"):
        ModelSpec.from_dict({"format": "flm-spec/1", "preset": "p"})
    with pytest.raises(SpecError, match="points"):
        ModelSpec("p", 67, "ibug68", 128, 3, "RGB", (0.5,) * 3, (0.2,) * 3, "coords")
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.from_json("{oops")
