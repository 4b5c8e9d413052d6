"""The built-in procedural face set: deterministic, exact landmarks, real pose range, Udacity export."""

import pickle

import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from flm.errors import FlmError
from flm.geometry import flip_permutation
from flm.pipeline.data import open_dataset
from flm.pipeline.data.synthetic import (IMAGE_SIZE_RANGE, IMAGES_PER_PERSON, MEAN_SHAPE, POSE_LIMITS,
                                         SyntheticFace, face_geometry, render, synthetic_dataset,
                                         write_udacity)


def test_mean_shape_is_ibug_ordered_and_mirror_symmetric():
    s = MEAN_SHAPE
    mirrored = s[flip_permutation("ibug68")] * [-1, 1, 1]
    np.testing.assert_allclose(mirrored, s, atol=1e-9)  # pairs of the iBUG flip table mirror each other
    assert s[0, 0] < s[8, 0] < s[16, 0] and s[8, 1] == s[:17, 1].max()  # jaw: left -> chin -> right
    assert s[17:27, 1].max() < s[36:48, 1].min()  # brows above eyes
    assert s[36:42, 0].max() < 0 < s[42:48, 0].min()  # eye 36-41 on the image left
    assert s[36, 0] < s[39, 0] < s[42, 0] < s[45, 0]  # outer, inner, inner, outer corners
    assert s[27, 1] < s[30, 1] < s[33, 1] < s[51, 1] < s[57, 1]  # nose bridge, tip, base, lips
    assert s[30, 2] == s[:, 2].max()  # the nose tip is nearest the camera


def test_deterministic_per_seed_and_index():
    a, b = render(7, 5), render(7, 5)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(face_geometry(7, 5).points, face_geometry(7, 5).points)
    assert not np.array_equal(face_geometry(7, 5).points, face_geometry(8, 5).points)
    assert not np.array_equal(face_geometry(7, 5).points, face_geometry(7, 6).points)
    ds1, ds2 = synthetic_dataset(6, seed=3), synthetic_dataset(6, seed=3)
    for s1, s2 in zip(ds1.samples, ds2.samples):
        np.testing.assert_array_equal(s1.points, s2.points)
        np.testing.assert_array_equal(s1.load(), s2.load())
    # the renderer travels to DataLoader workers
    face = pickle.loads(pickle.dumps(ds1.samples[2].image))
    assert face == SyntheticFace(3, 2)
    np.testing.assert_array_equal(face(), ds1.samples[2].load())


def test_dataset_shape_identities_and_sizes():
    ds = open_dataset("synthetic:40:1")
    assert (len(ds), ds.scheme, ds.num_points) == (40, "ibug68", 68)
    ids = [s.identity for s in ds.samples]
    assert len(set(ids)) == 40 // IMAGES_PER_PERSON and ids[0] == ids[IMAGES_PER_PERSON - 1] != ids[IMAGES_PER_PERSON]
    train, val = ds.split_by_identity(0.25, seed=0)
    assert len(train) + len(val) == 40 and not {s.identity for s in train.samples} & {s.identity for s in val.samples}
    centres = []
    for s in ds.samples[:12]:
        img = s.load()
        h, w = img.shape[:2]
        assert IMAGE_SIZE_RANGE[0] <= min(h, w) and max(h, w) <= IMAGE_SIZE_RANGE[1]
        assert (w, h) == s.image.size
        assert (s.points >= 0).all() and (s.points[:, 0] <= w - 1).all() and (s.points[:, 1] <= h - 1).all()
        centres.append(s.points.mean(0) / [w, h])
    assert np.ptp(np.array(centres), axis=0).min() > 0.1  # the face is not always in the middle


def _feature_diff(seed, i):
    """|image - the same image without eyes, brows, nose, mouth and jaw line|, max over 3x3."""
    full = render(seed, i, clean=True).astype(int)
    bare = render(seed, i, clean=True, features=False).astype(int)
    return maximum_filter(np.abs(full - bare).sum(-1), size=3)


def test_landmarks_lie_on_the_drawn_features():
    rng = np.random.default_rng(0)
    hits, misses, random_hits = 0, [], []
    for i in range(30):
        g = face_geometry(0, i)
        d = _feature_diff(0, i)
        p = np.round(g.points).astype(int)
        on = d[p[:, 1], p[:, 0]] >= 12
        assert on.sum() >= 66, f"face {i}: landmarks {np.where(~on)[0]} sit on no drawn feature"
        hits += on.sum()
        misses += [(i, k) for k in np.where(~on)[0]]
        # negative control: random pixels are mostly not on a feature, so the check can fail
        q = np.column_stack([rng.integers(0, g.width, 300), rng.integers(0, g.height, 300)])
        random_hits.append((d[q[:, 1], q[:, 0]] >= 12).mean())
    assert hits >= 0.99 * 30 * 68, misses
    assert np.mean(random_hits) < 0.2


def test_iris_and_eye_corners_differ_from_skin():
    for i in range(20):
        g = face_geometry(1, i)
        full = render(1, i, clean=True).astype(int)
        bare = render(1, i, clean=True, features=False).astype(int)
        for x, y in np.round(g.pupils).astype(int):
            assert np.abs(full[y, x] - bare[y, x]).sum() > 40, f"face {i}: no iris at the pupil"
            assert full[y, x].sum() < 150, f"face {i}: the pupil is not dark"
        d = _feature_diff(1, i)
        for k in (36, 39, 42, 45):
            x, y = np.round(g.points[k]).astype(int)
            assert d[y, x] >= 12, f"face {i}: eye corner {k} is not on the eye outline"


def test_pose_range_is_honoured_and_visible():
    poses, turn = [], []
    for i in range(300):
        g = face_geometry(2, i)
        poses.append([g.pose["yaw"], g.pose["pitch"], g.pose["roll"]])
        p = g.points
        iod = np.linalg.norm(p[45] - p[36])
        axis = (p[45] - p[36]) / iod  # the eye line, so roll does not count as yaw
        turn.append(np.dot(p[30] - (p[39] + p[42]) / 2, axis) / iod)
    poses = np.array(poses)
    limits = [POSE_LIMITS["yaw"], POSE_LIMITS["pitch"], POSE_LIMITS["roll"]]
    assert (np.abs(poses) <= limits).all()
    assert (np.abs(poses).max(0) > 0.85 * np.array(limits)).all()  # the range is really used
    assert (poses < 0).any(0).all() and (poses > 0).any(0).all()
    # the drawn face really turns: the nose tip moves along the eye line with yaw
    assert np.corrcoef(poses[:, 0], turn)[0, 1] > 0.9


def test_occluders_blur_and_noise_only_change_the_non_clean_render():
    diffs = [np.abs(render(4, i).astype(int) - render(4, i, clean=True).astype(int)).mean() for i in range(12)]
    assert max(diffs) > 5  # some faces get occluders, blur or noise
    np.testing.assert_array_equal(render(4, 0, clean=True), render(4, 0, clean=True))


def test_write_udacity_round_trip(tmp_path):
    ds = synthetic_dataset(8, seed=5)
    out = write_udacity(ds, tmp_path / "synth")
    header = (out / "landmarks.csv").read_text().split("\n")[0]
    assert header == "," + ",".join(str(i) for i in range(136))
    back = open_dataset(f"udacity:{out}")
    assert len(back) == 8 and [s.identity for s in back.samples] == [s.identity for s in ds.samples]
    for a, b in zip(ds.samples, back.samples):
        np.testing.assert_allclose(b.points, a.points, atol=1e-3)
        img_a, img_b = a.load(), b.load()
        assert img_a.shape == img_b.shape and np.abs(img_a.astype(int) - img_b).mean() < 12  # JPEG q95 on noisy images
    # a second run replaces the set atomically; nothing else is left beside it
    write_udacity(synthetic_dataset(4, seed=6), out)
    assert len(open_dataset(f"udacity:{out}")) == 4 and len(list((out / "images").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_write_udacity_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FlmError, match="refusing to replace"):
        write_udacity(synthetic_dataset(2), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
