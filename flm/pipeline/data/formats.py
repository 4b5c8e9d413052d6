"""Readers for every on-disk landmark format flm accepts. Each registers under its FORMAT name.

Every reader returns a `LandmarkDataset` of `Sample`s whose images are decoded later, on use.
What can be checked cheaply is checked when the set is opened: the annotation itself (point
count, numbers, NaN/inf, duplicates), that each image exists and is not empty, and - from the
image header, without decoding - that it is not a decompression bomb and that the points are
not wildly outside it. A problem raises `DatasetError` naming the annotation file and line;
with `skip_bad=True` the sample is left out and the reason kept in `ds.skipped`. Problems with
a whole file (not UTF-8, malformed XML, an unreadable .mat) stop even with `skip_bad`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path
from xml.parsers import expat

import numpy as np

from flm.errors import DatasetError, UsageError
from flm.images import IMAGE_SUFFIXES, MAX_PIXELS, image_size
from flm.pipeline.data.base import LandmarkDataset, Sample, check_points, register


# --------------------------------------------------------------------------- shared helpers


class _Collector:
    """Samples, plus the reasons for those left out when reading with skip_bad."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.samples, self.skipped = skip_bad, [], []

    @contextlib.contextmanager
    def record(self):
        try:
            yield
        except DatasetError as e:
            if not self.skip_bad:
                raise
            self.skipped.append(str(e))

    def dataset(self, name: str, scheme: str) -> LandmarkDataset:
        return LandmarkDataset(name, scheme, self.samples, self.skipped)


def _read_text(path: Path) -> list[str]:
    """The file's lines (1-based line i is lines[i - 1]); UTF-8, with or without a BOM."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(path, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(path, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})",
                           line) from None
    return [s.rstrip("\r") for s in text.split("\n")]


def _numbers(tokens, path, line: int) -> np.ndarray:
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise DatasetError(path, f"not a number: {bad[:40]!r}", line) from None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_image(image: Path, source, line: int | None) -> tuple[int, int] | None:
    """Cheap checks on an image file (no decoding); its (width, height) if the header tells."""
    try:
        st = image.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        raise DatasetError(source, f"image not found: {image}", line) from None
    if not image.is_file():
        raise DatasetError(source, f"image is not a file: {image}", line)
    if st.st_size == 0:
        raise DatasetError(source, f"image is empty (0 bytes): {image}", line)
    try:
        size = image_size(image)
    except OSError as e:
        raise DatasetError(source, f"cannot read image {image}: {e.strerror or e}", line) from None
    if size is not None:
        if size[0] * size[1] > MAX_PIXELS:
            raise DatasetError(source, f"image {image} is {size[0]}x{size[1]}, more than the "
                                       f"{MAX_PIXELS} pixels allowed (decompression-bomb guard)", line)
        if min(size) == 0:
            raise DatasetError(source, f"image {image} claims a size of {size[0]}x{size[1]}", line)
    return size


def _sample(image: Path, pts: np.ndarray, expected: int, source, line: int | None, **kw) -> Sample:
    """Validate the points against the image (where its size is cheap to know) and make a Sample."""
    size = _check_image(image, source, line)
    pts = check_points(pts, expected, source, line, image_size=size)
    meta = {"source": str(source), **kw.pop("meta", {})}
    return Sample(image, pts, line=line, meta=meta, **kw)


def _image_beside(stem_path: Path, source) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            p = stem_path.with_name(stem_path.name + s)
            if p.is_file():
                return p
    raise DatasetError(source, f"no image beside it (looked for {stem_path.name}"
                               f"{{{','.join(IMAGE_SUFFIXES)}}}, in lower or upper case)")


def _box(values, source, line) -> np.ndarray:
    box = np.asarray(values, dtype=np.float64)
    if not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(source, f"bad face box {box.tolist()} (expected x0 < x1, y0 < y1, finite)", line)
    return box.astype(np.float32)


# --------------------------------------------------------------------------- Udacity CSV


def _identity_from_name(name: str) -> str:
    """`Luis_Fonsi_921.jpg` -> `Luis_Fonsi` (YouTube Faces / Udacity naming)."""
    return re.sub(r"_\d+$", "", Path(name).stem)


def _udacity_images(csv_path: Path) -> Path:
    """DIR/images/ (flm's layout), DIR/X/ for X_frames_keypoints.csv (Udacity's archive ships
    training/ beside training_frames_keypoints.csv), else the CSV's own folder."""
    parent = csv_path.parent
    for sub in ("images", csv_path.stem.removesuffix("_frames_keypoints")):
        if sub != csv_path.stem and (parent / sub).is_dir():
            return parent / sub
    return parent


@register("udacity", "udacity:DIR (DIR/landmarks.csv + DIR/images/)",
          "Udacity keypoints CSV: file name + x0,y0..x67,y67; identity from the file name")
def read_udacity(path: str, skip_bad: bool = False) -> LandmarkDataset:
    root = Path(path)
    csv_path = root / "landmarks.csv" if root.is_dir() else root
    if not csv_path.is_file():
        raise DatasetError(csv_path, "Udacity CSV not found (expected DIR/landmarks.csv or a .csv file)")
    img_dir = _udacity_images(csv_path)
    lines = _read_text(csv_path)
    col, seen = _Collector(skip_bad), set()
    reader = csv.reader(io.StringIO("\n".join(lines)))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DatasetError(csv_path, f"malformed CSV: {e}", reader.line_num) from None
        lineno = reader.line_num
        if not row or (lineno == 1 and _is_header(row)):
            continue  # blank line or the header
        with col.record():
            if len(row) != 137:
                raise DatasetError(csv_path, f"expected a file name and 136 numbers, got {len(row) - 1} "
                                             "values", lineno)
            name = row[0].strip()
            if not name:
                raise DatasetError(csv_path, "empty image file name", lineno)
            if name in seen:
                raise DatasetError(csv_path, f"duplicate row for image {name!r}", lineno)
            values = _numbers(row[1:], csv_path, lineno)
            seen.add(name)
            col.samples.append(_sample(img_dir / name, values.reshape(-1, 2), 68, csv_path, lineno,
                                       identity=_identity_from_name(name)))
    return col.dataset(f"udacity:{path}", "ibug68")


def _is_header(row: list[str]) -> bool:
    # pandas writes ",0,1,...,135" (an empty first cell and column indices) as the header
    return not row[0].strip() or row[1:] == [str(i) for i in range(len(row) - 1)] \
        or not all(_is_number(v) for v in row[1:])


# --------------------------------------------------------------------------- dlib / iBUG XML


def _parse_dlib_xml(path: Path) -> list[dict]:
    """Boxes of a dlib imglab XML: [{file, line, attrs, parts: [(name, x, y, line)]}].

    expat (the parser under xml.etree) is used directly for its line numbers. Like defusedxml,
    any DOCTYPE is refused, so no entity can be declared or expanded (billion laughs, external
    entities); dlib's files never have one.
    """
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    boxes: list[dict] = []
    state = {"image": None, "box": None}

    def refuse(*_):
        raise DatasetError(path, "XML with a DOCTYPE or entity declaration is refused (entity "
                                 "expansion risk; dlib files have none)", p.CurrentLineNumber)

    def start(tag, attrs):
        line = p.CurrentLineNumber
        if tag == "image":
            state["image"] = (attrs.get("file"), line)
        elif tag == "box" and state["image"] is not None:
            state["box"] = {"file": state["image"][0], "line": line, "attrs": attrs, "parts": []}
        elif tag == "part" and state["box"] is not None:
            state["box"]["parts"].append((attrs.get("name"), attrs.get("x"), attrs.get("y"), line))

    def end(tag):
        if tag == "box" and state["box"] is not None:
            boxes.append(state["box"])
            state["box"] = None
        elif tag == "image":
            state["image"] = None

    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    p.ExternalEntityRefHandler = refuse
    p.StartElementHandler, p.EndElementHandler = start, end
    try:
        with open(path, "rb") as f:
            p.ParseFile(f)
    except expat.ExpatError as e:
        raise DatasetError(path, f"malformed XML: {expat.ErrorString(e.code)} (column {e.offset})",
                           e.lineno) from None
    except (LookupError, ValueError) as e:  # an unknown or unsupported declared encoding
        raise DatasetError(path, f"cannot decode the XML: {e}", p.CurrentLineNumber) from None
    except OSError as e:
        raise DatasetError(path, f"cannot read: {e.strerror or e}") from None
    return boxes


@register("ibug-xml", "ibug-xml:ibug_300W_large_face_landmark_dataset/labels_ibug_300W_train.xml",
          "dlib / iBUG 300-W XML: <image file> <box top left width height> 68 <part>s; box kept")
def read_ibug_xml(path: str, skip_bad: bool = False) -> LandmarkDataset:
    """One sample per <box> (boxes with ignore='1' are left out, as dlib does). Image paths are
    relative to the XML's folder; coordinates are used as stored."""
    xml = Path(path)
    if not xml.is_file():
        raise DatasetError(xml, "not a file (expected a dlib XML such as labels_ibug_300W_train.xml)")
    col, seen = _Collector(skip_bad), set()
    for b in _parse_dlib_xml(xml):
        line, attrs = b["line"], b["attrs"]
        if attrs.get("ignore", "0") not in ("0", ""):
            continue
        with col.record():
            if not b["file"]:
                raise DatasetError(xml, "<image> without a file attribute", line)
            try:
                top, left, w, h = (float(attrs[k]) for k in ("top", "left", "width", "height"))
            except KeyError as e:
                raise DatasetError(xml, f"<box> without a {e.args[0]!r} attribute", line) from None
            except ValueError:
                raise DatasetError(xml, f"<box> attributes are not numbers: {attrs}", line) from None
            box = _box([left, top, left + w, top + h], xml, line)
            pts = np.full((68, 2), np.nan)
            for name, x, y, pline in b["parts"]:
                if name is None or x is None or y is None:
                    raise DatasetError(xml, "<part> needs name, x and y attributes", pline)
                try:
                    k = int(name)
                except ValueError:
                    raise DatasetError(xml, f"<part> name {name!r} is not a point number", pline) from None
                if not 0 <= k < 68:
                    raise DatasetError(xml, f"<part> number {k} outside 0..67", pline)
                if not np.isnan(pts[k]).all():
                    raise DatasetError(xml, f"<part> {name!r} given twice", pline)
                pts[k] = _numbers([x, y], xml, pline)
                if not np.isfinite(pts[k]).all():
                    raise DatasetError(xml, f"<part> {name!r} is not finite ({x}, {y})", pline)
            missing = [k for k in range(68) if np.isnan(pts[k]).any()]
            if missing:
                raise DatasetError(xml, f"<box> has {68 - len(missing)} of the 68 parts "
                                        f"(missing {', '.join(f'{k:02d}' for k in missing[:5])}"
                                        f"{'...' if len(missing) > 5 else ''})", line)
            key = (b["file"], tuple(box.tolist()))
            if key in seen:
                raise DatasetError(xml, f"duplicate box for image {b['file']!r}", line)
            seen.add(key)
            col.samples.append(_sample(xml.parent / b["file"], pts, 68, xml, line, box=box))
    return col.dataset(f"ibug-xml:{path}", "ibug68")


# --------------------------------------------------------------------------- iBUG .pts


def parse_pts(path: Path, expected: int = 68) -> tuple[np.ndarray, list[int]]:
    """Points of a .pts file as written (1-based), and the line of each point.

    The iBUG layout is a `key: value` header (`version: 1`, `n_points: 68`), then the points
    between `{` and `}`. Some public 300-W copies drop the header and braces: a file whose first
    line holds only numbers is read as exactly `expected` lines of `x y`."""
    lines = _read_text(path)
    first = next((s.split() for s in lines if s.strip()), [])
    if first and all(_is_number(t) for t in first):
        return _parse_bare_pts(path, lines, expected)
    n_points, i = None, 0
    while i < len(lines) and lines[i].strip() != "{":  # header: "key: value" lines
        s = lines[i].strip()
        if s:
            key, sep, value = s.partition(":")
            if not sep:
                raise DatasetError(path, f"expected a 'key: value' header line or '{{', got {s[:40]!r}", i + 1)
            if key.strip() == "n_points":
                try:
                    n_points = int(value)
                except ValueError:
                    raise DatasetError(path, f"n_points is not a whole number: {value.strip()[:20]!r}",
                                       i + 1) from None
        i += 1
    if i == len(lines):
        raise DatasetError(path, "no '{' opening the point list", len(lines))
    if n_points is None:
        raise DatasetError(path, "no 'n_points:' line before '{'", i + 1)
    if n_points != expected:
        raise DatasetError(path, f"n_points: {n_points}, expected {expected} (the 68-point iBUG scheme)",
                           i + 1)
    pts, where = [], []
    i += 1
    while i < len(lines) and lines[i].strip() != "}":
        s = lines[i].split()
        if s:
            if len(s) != 2:
                raise DatasetError(path, f"expected 'x y', got {lines[i].strip()[:40]!r}", i + 1)
            pts.append(_numbers(s, path, i + 1))
            where.append(i + 1)
        i += 1
    if i == len(lines):
        raise DatasetError(path, "no '}' closing the point list", len(lines))
    if len(pts) != n_points:
        raise DatasetError(path, f"n_points says {n_points} but the list holds {len(pts)} points", i + 1)
    rest = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
    if rest is not None:
        raise DatasetError(path, f"unexpected text after '}}': {lines[rest].strip()[:40]!r}", rest + 1)
    return np.array(pts).reshape(-1, 2), where


def _parse_bare_pts(path: Path, lines: list[str], expected: int) -> tuple[np.ndarray, list[int]]:
    """A .pts without header or braces: one `x y` line per point, blank lines ignored."""
    pts, where = [], []
    for lineno, text in enumerate(lines, start=1):
        tokens = text.split()
        if not tokens:
            continue
        if len(tokens) != 2:
            raise DatasetError(path, f"expected 'x y' (a .pts without a header holds {expected} such lines), "
                                     f"got {text.strip()[:40]!r}", lineno)
        if len(pts) == expected:
            raise DatasetError(path, f"more than {expected} 'x y' lines in a .pts without a header "
                                     f"(expected the {expected}-point iBUG scheme)", lineno)
        pts.append(_numbers(tokens, path, lineno))
        where.append(lineno)
    if len(pts) != expected:
        raise DatasetError(path, f"{len(pts)} 'x y' lines in a .pts without a header, expected {expected} "
                                 f"(the {expected}-point iBUG scheme)", where[-1])
    return np.array(pts).reshape(-1, 2), where


@register("ibug-pts", "ibug-pts:300W/ (images with .pts files beside them)",
          "iBUG .pts beside images (300-W, LFPW, HELEN, AFW, IBUG, menpo); 1-based, converted to 0-based")
def read_ibug_pts(path: str, skip_bad: bool = False) -> LandmarkDataset:
    """Every `NAME.pts` under PATH (searched recursively) with an image `NAME.jpg/.png/.ppm/...`
    beside it (any type in IMAGE_SUFFIXES). The .pts may lack the header (see `parse_pts`).
    The .pts convention is 1-based (MATLAB), so 1 is subtracted from every coordinate."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.pts"))
    if not files:
        raise DatasetError(root, "no .pts files found under it")
    col = _Collector(skip_bad)
    for pts_path in files:
        with col.record():
            raw, where = parse_pts(pts_path)
            image = _image_beside(pts_path.with_suffix(""), pts_path)
            bad = ~np.isfinite(raw).all(axis=1)
            line = where[int(np.argmax(bad))] if bad.any() else None
            col.samples.append(_sample(image, raw - 1.0, 68, pts_path, line,
                                       identity=_photo_identity(pts_path, root)))
    return col.dataset(f"ibug-pts:{path}", "ibug68")


def _photo_identity(pts_path: Path, root: Path) -> str:
    """The photo a face comes from, so a split keeps one photo's faces on one side: AFW and HELEN
    name faces `PHOTO_FACE` (`1051618982_2` is face 2 of photo 1051618982); other names
    (`image_0001`) are one photo each. Prefixed with the folder, so parts never merge."""
    stem = pts_path.stem
    m = re.fullmatch(r"(\d+)_\d+", stem)
    folder = pts_path.parent.relative_to(root).as_posix() if root.is_dir() else ""
    return f"{folder}/{m.group(1) if m else stem}"


# --------------------------------------------------------------------------- WFLW


WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")


def wflw_images_dir(annotation: Path) -> Path:
    """`WFLW_images/` beside the annotation file or in one of its three nearest parent folders
    (the official layout is WFLW/WFLW_annotations/list_98pt_rect_attr_train_test/*.txt next to
    WFLW/WFLW_images/); otherwise the annotation file's own folder."""
    for d in [annotation.parent, *annotation.parent.parents][:4]:
        if (d / "WFLW_images").is_dir():
            return d / "WFLW_images"
    return annotation.parent


@register("wflw", "wflw:WFLW/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt",
          "WFLW 98-point text: 196 coords, box, 6 attribute flags, image path (under WFLW_images/)")
def read_wflw(path: str, skip_bad: bool = False) -> LandmarkDataset:
    ann = Path(path)
    if not ann.is_file():
        raise DatasetError(ann, "not a file (expected a WFLW annotation .txt, e.g. list_98pt_rect_attr_train.txt)")
    images = wflw_images_dir(ann)
    col, seen = _Collector(skip_bad), set()
    for lineno, text in enumerate(_read_text(ann), start=1):
        tokens = text.split()
        if not tokens:
            continue
        with col.record():
            n = next((k for k, t in enumerate(tokens) if not _is_number(t)), len(tokens))
            if n != 206:
                raise DatasetError(ann, f"expected 206 numbers (196 coordinates, 4 box values, 6 attribute "
                                        f"flags) before the image path, got {n}", lineno)
            if n == len(tokens):
                raise DatasetError(ann, "no image path after the 206 numbers", lineno)
            name = text.split(maxsplit=206)[-1].strip()  # keeps spaces inside the path
            values = _numbers(tokens[:206], ann, lineno)
            flags = values[200:]
            if not np.isin(flags, (0, 1)).all():
                raise DatasetError(ann, f"attribute flags must be 0 or 1, got {flags.tolist()}", lineno)
            key = (name, tuple(tokens[:206]))
            if key in seen:
                raise DatasetError(ann, f"duplicate row for image {name!r}", lineno)
            seen.add(key)
            box = _box(values[196:200], ann, lineno)
            meta = {k: int(v) for k, v in zip(WFLW_ATTRIBUTES, flags)}
            col.samples.append(_sample(images / name, values[:196].reshape(98, 2), 98, ann, lineno,
                                       box=box, meta=meta))
    return col.dataset(f"wflw:{path}", "wflw98")


# --------------------------------------------------------------------------- AFLW2000-3D


@register("aflw2000", "aflw2000:AFLW2000/ (imageNNNNN.jpg + imageNNNNN.mat)",
          "AFLW2000-3D: pt3d_68 (x, y rows) and Pose_Para -> meta yaw/pitch/roll in degrees")
def read_aflw2000(path: str, skip_bad: bool = False) -> LandmarkDataset:
    """Every `NAME.mat` in PATH with `NAME.jpg` beside it. Points are the first two rows of
    `pt3d_68`, used as stored; `Pose_Para` = [pitch, yaw, roll (radians), tx, ty, tz, scale].
    The angles are kept in degrees wrapped to (-180, 180]: some files store e.g. -351.2 for 8.8."""
    try:
        import scipy.io
    except ImportError:
        raise UsageError("reading AFLW2000-3D .mat files needs scipy", example="pip install 'flm[train]'") from None
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.mat"))
    if not files:
        raise DatasetError(root, "no .mat files in it (expected AFLW2000-3D imageNNNNN.mat files)")
    col = _Collector(skip_bad)
    for mat_path in files:
        with col.record():
            try:
                mat = scipy.io.loadmat(str(mat_path), variable_names=("pt3d_68", "Pose_Para"))
            except Exception as e:  # noqa: BLE001 - loadmat raises many types on a corrupt file
                raise DatasetError(mat_path, f"cannot read .mat file ({type(e).__name__}: {e})") from None
            pts3 = _mat_field(mat, "pt3d_68", mat_path)
            if pts3.ndim != 2 or pts3.shape[0] not in (2, 3) or pts3.shape[1] != 68:
                raise DatasetError(mat_path, f"pt3d_68: expected a 3x68 array, got shape {pts3.shape}")
            pose = _mat_field(mat, "Pose_Para", mat_path).reshape(-1)
            if pose.size < 3 or not np.isfinite(pose[:3]).all():
                raise DatasetError(mat_path, f"Pose_Para: expected [pitch, yaw, roll, ...] in radians, "
                                             f"got {pose[:3].tolist()}")
            with np.errstate(over="ignore", invalid="ignore"):  # refused just below
                pitch, yaw, roll = wrap_degrees(np.degrees(pose[:3]))
            if not np.isfinite([pitch, yaw, roll]).all():
                raise DatasetError(mat_path, f"Pose_Para: pitch, yaw, roll {pose[:3].tolist()} radians are "
                                             "too large to be angles")
            image = _image_beside(mat_path.with_suffix(""), mat_path)
            col.samples.append(_sample(image, pts3[:2].T, 68, mat_path, None,
                                       meta={"yaw": float(yaw), "pitch": float(pitch), "roll": float(roll)}))
    ds = col.dataset(f"aflw2000:{path}", "ibug68")
    ds.norm = "bbox"  # the AFLW2000-3D protocol: NME over the landmark box sqrt(w*h), by |yaw| bin
    return ds


def wrap_degrees(angle):
    """An angle (or array of angles) in degrees, wrapped to (-180, 180]: 190 -> -170, -180 -> 180."""
    wrapped = 180.0 - np.mod(180.0 - np.asarray(angle, dtype=np.float64), 360.0)
    return np.where(wrapped <= -180.0, wrapped + 360.0, wrapped)  # mod rounds a hair below 180 to 360


def _mat_field(mat: dict, name: str, path: Path) -> np.ndarray:
    if name not in mat:
        raise DatasetError(path, f"no {name!r} variable in the .mat file")
    try:
        return np.asarray(mat[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(path, f"{name}: not a numeric array") from None


# --------------------------------------------------------------------------- FaceSynthetics


@register("facesynthetics", "facesynthetics:dataset_100000/ (000000.png + 000000_ldmks.txt)",
          "Microsoft FaceSynthetics: 70 'x y' lines = 68 iBUG points + 2 pupils (kept in meta)")
def read_facesynthetics(path: str, skip_bad: bool = False) -> LandmarkDataset:
    """Every `NAME_ldmks.txt` under PATH with `NAME.png` beside it. The first 68 of its 70
    points are the iBUG 68; the last two (pupils) go to `meta["pupils"]` as a (2, 2) array."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*_ldmks.txt"))
    if not files:
        raise DatasetError(root, "no *_ldmks.txt files under it")
    col = _Collector(skip_bad)
    for txt in files:
        with col.record():
            rows, where = [], []
            for lineno, text in enumerate(_read_text(txt), start=1):
                tokens = text.split()
                if not tokens:
                    continue
                if len(tokens) != 2:
                    raise DatasetError(txt, f"expected 'x y', got {text.strip()[:40]!r}", lineno)
                rows.append(_numbers(tokens, txt, lineno))
                where.append(lineno)
            if len(rows) != 70:
                raise DatasetError(txt, f"expected 70 points (68 + 2 pupils), got {len(rows)}",
                                   where[-1] if where else 1)
            pts = np.array(rows)
            bad = ~np.isfinite(pts).all(axis=1)
            line = where[int(np.argmax(bad))] if bad.any() else None
            if bad[68:].any():
                raise DatasetError(txt, f"pupil point is not finite ({pts[68:][bad[68:]][0].tolist()})", line)
            image = _image_beside(txt.with_name(txt.name[:-len("_ldmks.txt")]), txt)
            col.samples.append(_sample(image, pts[:68], 68, txt, line,
                                       meta={"pupils": pts[68:].astype(np.float32)}))
    return col.dataset(f"facesynthetics:{path}", "ibug68")


# --------------------------------------------------------------------------- built-in synthetic


@register("synthetic", "synthetic | synthetic:N | synthetic:N:SEED",
          "built-in procedural faces (no download); N default 1200, 4 images per identity")
def read_synthetic(path: str, skip_bad: bool = False) -> LandmarkDataset:
    from flm.pipeline.data.synthetic import synthetic_dataset

    n, seed = 1200, 0
    parts = path.split(":") if path else []
    try:
        if len(parts) > 2:
            raise ValueError
        if parts:
            n = int(parts[0])
        if len(parts) == 2:
            seed = int(parts[1])
    except ValueError:
        raise UsageError(f"bad synthetic set {'synthetic:' + path!r}: expected synthetic:N or synthetic:N:SEED "
                         "with whole numbers", example="synthetic:1200:0") from None
    if not 1 <= n <= 10_000_000 or seed < 0:
        raise UsageError(f"synthetic set size must be 1..10000000 and the seed >= 0, got N={n}, SEED={seed}",
                         example="synthetic:1200:0")
    return synthetic_dataset(n, seed)

