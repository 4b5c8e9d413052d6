"""Loaders: every format against the same list of bad inputs, property tests on the parsers that
tests/test_data_formats.py does not fuzz, and `flm train --skip-bad` through the command line."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flm.errors import DatasetError, SpecError, UsageError
from flm.images import header_size, load_image, to_rgb_uint8
from flm.pipeline.data import check_points, open_dataset
from flm.spec import SPEC_FORMAT, ModelSpec

from tests.helpers.cli import Flm
from tests.helpers.data import bomb_header, face_points, write_image

# --------------------------------------------------------------------------- every format x every bad input
# Each writer puts one good sample "a" and one sample "b" in a fresh folder and returns
# (FORMAT:PATH, the annotation file that describes "b", the image file of "b").


def _udacity(root: Path, pts_b):
    lines = [",".join([""] + [str(i) for i in range(136)])]
    for name, pts in (("a_1.jpg", face_points(0)), ("b_2.jpg", pts_b)):
        lines.append(",".join([name] + [repr(float(v)) for v in np.asarray(pts).reshape(-1)]))
    (root / "landmarks.csv").write_text("\n".join(lines) + "\n")
    write_image(root / "images" / "a_1.jpg")
    return f"udacity:{root}", root / "landmarks.csv", root / "images" / "b_2.jpg"


def _ibug_xml(root: Path, pts_b):
    out = ["<?xml version='1.0' encoding='UTF-8'?>", "<dataset>", "<images>"]
    for name, pts in (("a.jpg", face_points(0)), ("b.jpg", pts_b)):
        out += [f"<image file='{name}'>", "<box top='5' left='5' width='100' height='90'>"]
        out += [f"<part name='{k:02d}' x='{x}' y='{y}'/>" for k, (x, y) in enumerate(np.asarray(pts))]
        out += ["</box>", "</image>"]
    (root / "x.xml").write_text("\n".join(out + ["</images>", "</dataset>"]) + "\n")
    write_image(root / "a.jpg")
    return f"ibug-xml:{root / 'x.xml'}", root / "x.xml", root / "b.jpg"


def _ibug_pts(root: Path, pts_b):
    for name, pts in (("a", face_points(0)), ("b", pts_b)):
        pts = np.asarray(pts) + 1.0  # .pts files are 1-based
        (root / f"{name}.pts").write_text("version: 1\nn_points: 68\n{\n"
                                          + "".join(f"{x} {y}\n" for x, y in pts) + "}\n")
    write_image(root / "a.jpg")
    return f"ibug-pts:{root}", root / "b.pts", root / "b.jpg"


def _wflw(root: Path, pts_b):
    lines = []
    for name, pts in (("a.jpg", face_points(0, 98)), ("b.jpg", pts_b)):
        values = [*np.asarray(pts).reshape(-1), 5, 5, 110, 95, 0, 0, 0, 0, 0, 0]
        lines.append(" ".join(str(float(v)) if i < 200 else str(int(v)) for i, v in enumerate(values)) + f" {name}")
    (root / "ann.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "WFLW_images" / "a.jpg")
    return f"wflw:{root / 'ann.txt'}", root / "ann.txt", root / "WFLW_images" / "b.jpg"


def _aflw2000(root: Path, pts_b):
    import scipy.io

    for name, pts in (("image00001", face_points(0)), ("image00002", pts_b)):
        pts = np.asarray(pts, np.float64)
        scipy.io.savemat(str(root / f"{name}.mat"), {"pt3d_68": np.vstack([pts.T, np.zeros((1, len(pts)))]),
                                                     "Pose_Para": np.zeros((1, 7))})
    write_image(root / "image00001.jpg")
    return f"aflw2000:{root}", root / "image00002.mat", root / "image00002.jpg"


def _facesynthetics(root: Path, pts_b):
    for name, pts in (("000000", face_points(0)), ("000001", pts_b)):
        pts = np.vstack([np.asarray(pts), [[40.0, 40.0], [80.0, 40.0]]])  # + 2 pupils
        (root / f"{name}_ldmks.txt").write_text("".join(f"{x} {y}\n" for x, y in pts))
    write_image(root / "000000.png")
    return f"facesynthetics:{root}", root / "000001_ldmks.txt", root / "000001.png"


FORMATS = {"udacity": (_udacity, 68), "ibug-xml": (_ibug_xml, 68), "ibug-pts": (_ibug_pts, 68),
           "wflw": (_wflw, 98), "aflw2000": (_aflw2000, 68), "facesynthetics": (_facesynthetics, 68)}
# bad input -> (points of "b", what to do with b's image, words every format's message has)
BAD = {
    "missing image": (None, "none", ("image", "b")),
    "zero-byte image": (None, "empty", ("0 bytes",)),
    "bomb header": (None, "bomb", ("20000x20000", "decompression-bomb")),
    "NaN point": ("nan", "good", ("not finite",)),
    "inf point": ("inf", "good", ("not finite",)),
    "far outside the image": ("far", "good", ("outside",)),
    "one point missing": ("short", "good", ()),
}


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_refuses_then_skips_each_bad_input(tmp_path, fmt, bad):
    write, k = FORMATS[fmt]
    points, image, words = BAD[bad]
    pts = face_points(1, k)
    if points == "nan":
        pts[3, 0] = np.nan
    elif points == "inf":
        pts[5, 1] = np.inf
    elif points == "far":
        pts[7] = [5000.0, 50.0]
    elif points == "short":
        pts = pts[:-1]
    spec, annotation, image_b = write(tmp_path, pts)
    if image == "good":
        write_image(image_b, seed=2)
    elif image == "empty":
        image_b.write_bytes(b"")
    elif image == "bomb":
        bomb_header(image_b)
    with pytest.raises(DatasetError) as err:
        open_dataset(spec)
    message = str(err.value)
    assert err.value.path == str(annotation), message  # names the file that describes the sample...
    assert all(w in message for w in words), message  # ...and what is wrong with it
    if fmt in ("udacity", "ibug-xml", "wflw"):  # one annotation file for many samples: the line too
        # b's row: line 3 of the CSV (after the header), line 2 of the WFLW list, and in the XML
        # its <box> (line 77) or the offending <part> after it
        assert {"udacity": 3, "wflw": 2}.get(fmt, err.value.line) == err.value.line, message
        assert err.value.line >= (77 if fmt == "ibug-xml" else 2), message
    ds = open_dataset(spec, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1, ds.skipped
    assert str(annotation) in ds.skipped[0] and all(w in ds.skipped[0] for w in words)
    assert ds.samples[0].load().shape == (100, 120, 3)  # the good one is still there and decodes


# --------------------------------------------------------------------------- property tests
# tests/test_data_formats.py fuzzes the Udacity, .pts, dlib XML and WFLW readers; these cover the
# other parsers a user's file goes through: FaceSynthetics, AFLW2000 .mat, image headers and
# decoding, the point checks, the FORMAT:PATH name, and the model spec JSON.


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    write_image(d / "000000.png")
    write_image(d / "image00001.jpg")
    return d


_line = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.floats(-50, 200).map(lambda v: f"{v:.2f}"), st.sampled_from(["", "x", "1e999", "-0", "nan"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.one_of(st.lists(_line, max_size=75),
                       st.lists(st.tuples(_num, _num).map(" ".join), min_size=68, max_size=72)),
       skip=st.booleans())
def test_facesynthetics_garbage_only_ever_raises_dataset_error(fuzz_dir, lines, skip):
    path = fuzz_dir / "000000_ldmks.txt"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        ds = open_dataset(f"facesynthetics:{path}", skip_bad=skip)
    except DatasetError as e:
        assert e.path in (str(path), str(fuzz_dir / "000000.png"), f"facesynthetics:{path}"), e
        return
    s = ds.samples[0]
    assert s.points.shape == (68, 2) and np.isfinite(s.points).all() and s.meta["pupils"].shape == (2, 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=400),
                      st.binary(max_size=200).map(lambda b: b"MATLAB 5.0 MAT-file, Platform: x" + b" " * 92 + b)),
       skip=st.booleans())
def test_aflw2000_garbage_mat_only_ever_raises_dataset_error(fuzz_dir, data, skip):
    path = fuzz_dir / "image00001.mat"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as err:  # skip_bad or not: nothing usable is left
        open_dataset(f"aflw2000:{path}", skip_bad=skip)
    assert err.value.path in (str(path), f"aflw2000:{path}") or str(path) in str(err.value)


_arrays = st.builds(lambda shape, fill: np.full(shape, fill, np.float64),
                    st.sampled_from([(3, 68), (2, 68), (3, 67), (68, 3), (1, 1), (0,), (3, 68, 1)]),
                    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(10.0)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pt3d=st.one_of(_arrays, st.just("text")), pose=st.one_of(_arrays, st.just(np.zeros((1, 7)))),
       noise=st.floats(0, 60))
def test_aflw2000_odd_arrays_parse_or_raise_dataset_error(fuzz_dir, pt3d, pose, noise):
    import scipy.io

    path = fuzz_dir / "image00001.mat"
    if isinstance(pt3d, np.ndarray) and pt3d.shape == (3, 68):
        pt3d = pt3d + np.random.default_rng(0).uniform(0, noise, pt3d.shape)  # spread: not collapsed
    scipy.io.savemat(str(path), {"pt3d_68": pt3d, "Pose_Para": pose})
    try:
        ds = open_dataset(f"aflw2000:{path}")
    except DatasetError:
        return
    s = ds.samples[0]
    assert s.points.shape == (68, 2) and np.isfinite(s.points).all()
    assert all(math.isfinite(s.meta[k]) for k in ("yaw", "pitch", "roll"))


def _png_bytes(seed=0):
    import cv2

    img = np.random.default_rng(seed).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes(), cv2.imencode(".jpg", img)[1].tobytes()


PNG, JPG = _png_bytes()


@st.composite
def _mangled_image(draw):
    """Real PNG / JPEG bytes, truncated and with a few bytes changed, or pure noise."""
    base = draw(st.sampled_from([PNG, JPG, b""]))
    data = bytearray(base[: draw(st.integers(0, len(base)))])
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=20))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_mangled_image(), st.binary(max_size=300)))
def test_image_files_decode_to_rgb_or_raise_dataset_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-image.bin"
    path.write_bytes(data)
    size = header_size(data)
    assert size is None or (len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size))
    try:
        img = load_image(path, 3)
    except DatasetError as e:
        assert e.path == str(path) and e.line == 3
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


_dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_, np.int8])


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), dtype=_dtypes,
       fill=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-300, 70000)), bgr=st.booleans())
def test_any_array_becomes_rgb_uint8_or_a_value_error(shape, dtype, fill, bgr):
    with np.errstate(all="ignore"):
        try:
            a = np.full(shape, fill).astype(dtype)
        except (OverflowError, ValueError):
            return
    try:
        out = to_rgb_uint8(a, "array", bgr=bgr)
    except ValueError as e:
        assert "array" in str(e)
        return
    assert out.dtype == np.uint8 and out.shape == (*a.shape[:2], 3)


@settings(max_examples=60, deadline=None)
@given(pts=st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True,
                                                                                            allow_infinity=True)),
                    min_size=0, max_size=70),
       size=st.one_of(st.none(), st.tuples(st.integers(1, 5000), st.integers(1, 5000))))
def test_point_check_returns_finite_points_or_names_the_line(pts, size):
    try:
        out = check_points(np.array(pts).reshape(-1, 2), 68, "f.csv", 9, image_size=size)
    except DatasetError as e:
        assert (e.path, e.line) == ("f.csv", 9)
        return
    assert out.shape == (68, 2) and out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=30))
def test_dataset_names_give_a_usage_or_dataset_error(tmp_path_factory, name):
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.getbasetemp())  # relative paths resolve inside the test's folder
    try:
        ds = open_dataset(name)
    except (UsageError, DatasetError) as e:
        if isinstance(e, UsageError):
            assert e.example and "udacity:" in e.example or "synthetic" in str(e)
        return
    except ValueError as e:  # a NUL byte in a path: Python refuses it before any reader runs
        assert "null" in str(e).lower() or "embedded" in str(e).lower()
        pytest.fail(f"open_dataset({name!r}) raised a bare ValueError: {e}")
    finally:
        os.chdir(cwd)
    assert name.startswith("synthetic") and len(ds) > 0


_spec_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True), st.text(max_size=8),
                         st.lists(st.floats(allow_nan=True), max_size=4), st.dictionaries(st.text(max_size=5),
                                                                                          st.integers(), max_size=2))
GOOD_SPEC = {"format": SPEC_FORMAT, "preset": "x", "num_points": 68, "scheme": "ibug68", "input_size": 64,
             "channels": 1, "color_order": "GRAY", "mean": [0.5], "std": [0.25], "output": "coords"}


@settings(max_examples=80, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(GOOD_SPEC) + ["heatmap_size", "crop", "extra"]),
                               _spec_values, max_size=3),
       drop=st.lists(st.sampled_from(sorted(GOOD_SPEC)), max_size=2), raw=st.one_of(st.none(), st.text(max_size=40)))
def test_model_spec_json_parses_or_raises_spec_error(changes, drop, raw):
    d = {k: v for k, v in {**GOOD_SPEC, **changes}.items() if k not in drop}
    text = raw if raw is not None else json.dumps(d)
    try:
        spec = ModelSpec.from_json(text, source="m.onnx")
    except SpecError as e:
        assert "m.onnx" in str(e) or str(e).startswith("spec:")
        return
    assert spec.num_points > 0 or spec.scheme not in ("ibug68",)
    assert ModelSpec.from_json(spec.to_json()) == spec  # what parses, round-trips


def test_model_spec_negative_control():
    assert ModelSpec.from_json(json.dumps(GOOD_SPEC)).num_points == 68
    with pytest.raises(SpecError):
        ModelSpec.from_json(json.dumps({**GOOD_SPEC, "num_points": 12}))


# --------------------------------------------------------------------------- --skip-bad through `flm train`


def _bad_udacity_set(root: Path) -> dict:
    """A Udacity set of 24 generated faces with 3 bad rows: NaN point, missing image, and a
    truncated JPEG whose header is intact (only decoding finds it)."""
    from flm.pipeline.data.synthetic import synthetic_dataset, write_udacity

    write_udacity(synthetic_dataset(24, seed=1), root)
    csv = root / "landmarks.csv"
    lines = csv.read_text().splitlines()
    names = [line.split(",")[0] for line in lines[1:]]
    cells = lines[2].split(",")
    cells[7] = "nan"
    lines[2] = ",".join(cells)  # line 3
    (root / "images" / names[2]).unlink()  # line 4
    jpg = root / "images" / names[3]  # line 5
    jpg.write_bytes(jpg.read_bytes()[:1500])
    csv.write_text("\n".join(lines) + "\n")
    return {"csv": csv, "missing": names[2], "truncated": names[3]}


def test_train_stops_on_a_bad_sample_or_skips_and_reports_with_skip_bad(tmp_path):
    bad = _bad_udacity_set(tmp_path / "set")
    only_truncated = tmp_path / "set2"  # the same set with only the truncated JPEG left bad
    shutil.copytree(tmp_path / "set", only_truncated)
    lines = (only_truncated / "landmarks.csv").read_text().splitlines()
    (only_truncated / "landmarks.csv").write_text("\n".join([lines[0], lines[1], *lines[4:]]) + "\n")  # now line 3
    common = ["train", "--img-size", "64", "--batch-size", "4", "--epochs", "1", "--max-steps", "2",
              "--val-fraction", "0.2", "--workers", "1"]  # one loader worker (the default): where a decode
    # error used to surface as a DataLoader traceback
    skip = Flm(*common, "--data", f"udacity:{tmp_path / 'set'}", "--out", tmp_path / "skip", "--skip-bad")
    undecodable = Flm(*common, "--data", f"udacity:{only_truncated}", "--out", tmp_path / "undecodable")
    # default: stop before training with one line naming the file and line. (A bad annotation row
    # stops the same way: tests/test_data_formats.py.) A JPEG whose header is fine but whose data
    # is cut is only found by decoding, which now happens before training, not in a worker.
    assert undecodable.wait() == 1, undecodable.stderr
    err = undecodable.stderr
    assert "Traceback" not in err and f"{bad['truncated']}:3" in err and "cannot decode" in err and "--skip-bad" in err
    assert not (tmp_path / "undecodable" / "last.pt").exists()
    # --skip-bad: trains on the rest and says how many were skipped and why
    assert skip.wait() == 0, skip.stderr
    err = " ".join(skip.stderr.split())  # rich wraps long log lines
    assert "Traceback" not in err
    assert "skipped 2 bad sample(s)" in err and "not finite" in err  # found when the set is read
    assert "skipped 1 sample(s) whose image cannot be decoded" in err and bad["truncated"] in err
    m = re.search(r"\[set, (\d+) faces\]; validating on set \((\d+) faces", err)
    assert m and int(m.group(1)) + int(m.group(2)) == 21, err  # 24 rows - 3 bad
    assert (tmp_path / "skip" / "last.pt").is_file()
