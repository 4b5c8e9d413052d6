"""`flm data download NAME --to DIR`: fetch a public landmark dataset, verify it, unpack it safely.

- Resumable: bytes arrive in `DIR/FILE.part`; a rerun asks the server for the rest
  (`Range: bytes=N-`) and starts again only if the server ignores the request.
- Verified: each file's SHA-256 (and size, where known) is checked before it is renamed into
  place. A file that does not match is kept as `DIR/FILE.bad` for inspection, never used.
- Honest about checksums: none of these providers publishes a SHA-256, and flm has not pinned
  one it could vouch for, so the catalogue says `None`. An unknown checksum is not trusted
  silently: the command refuses unless given `--sha256 HEX` (from a source you trust) or
  `--no-verify`, which downloads anyway and prints and records the SHA-256 it got
  (`DIR/.flm-downloads.json`) so you can pin it next time.
- Safe extraction: every member of a tar or zip is checked before anything is written: no
  absolute paths, no `..`, no links of any kind (symlinks or hard links; no dataset here has
  one), no device files or FIFOs. tarfile's `filter="data"` is applied as well.
- `--mirror URL` (or `FLM_DATA_MIRROR`) fetches `URL/NAME/FILE` instead of the provider's
  address: a local copy, a lab server, or the tests' server on 127.0.0.1.

Only the standard library's urllib is used.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import typer

from flm.errors import FlmError, UsageError
from flm.fileio import atomic_path, remove, replace

log = logging.getLogger("flm")

CHUNK = 1 << 20
TIMEOUT_S = 30
MANIFEST = ".flm-downloads.json"
USER_AGENT = "flm-data-download/1 (+urllib)"


# --------------------------------------------------------------------------- errors


class DownloadError(FlmError):
    """A download that cannot go on: HTTP error, wrong content, interrupted transfer."""


class NetworkUnavailable(DownloadError):
    """No connection to the host at all (DNS, refused, unreachable, timed out)."""


class ChecksumMismatch(DownloadError):
    def __init__(self, path, expected: str, actual: str, kept):
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(f"{Path(path).name}: SHA-256 {actual} does not match the expected {expected}; "
                         f"the file is kept as {kept} (not used). Delete it and run again; if it "
                         "fails again the source has changed: check it before passing --sha256")


class UnsafeArchive(DownloadError):
    def __init__(self, archive, member: str, problem: str):
        self.archive, self.member = str(archive), member
        super().__init__(f"{archive}: refusing to extract member {member!r}: {problem}; nothing was extracted")


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class RemoteFile:
    name: str  # the file name written under --to
    urls: tuple[str, ...]  # tried in order
    sha256: str | None = None  # None: no checksum published by the provider or pinned by flm
    size: int | None = None  # exact bytes, None where not known


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    files: tuple[RemoteFile, ...]
    page: str  # where the provider describes it (licence, terms, registration)
    use: str = ""  # FORMAT:PATH to read it with, PATH relative to --to
    approx_size: str = ""  # for the listing only; never used for verification
    join: str | None = None  # the parts are one archive split in pieces: concatenate into this name
    extract: bool = True
    notes: str = ""


IBUG = "https://ibug.doc.ic.ac.uk/download/annotations/"
CATALOGUE: dict[str, Dataset] = {d.name: d for d in (
    Dataset("300w-dlib", "iBUG 300-W as packaged by dlib (afw, helen, ibug, lfpw + dlib XML labels)",
            (RemoteFile("ibug_300W_large_face_landmark_dataset.tar.gz",
                        ("http://dlib.net/files/data/ibug_300W_large_face_landmark_dataset.tar.gz",)),),
            page="http://dlib.net/", approx_size="about 1.7 GB",
            use="ibug-xml:ibug_300W_large_face_landmark_dataset/labels_ibug_300W_train.xml",
            notes="300-W images are for research use only (see the iBUG 300-W page)."),
    Dataset("300w", "300-W challenge set from its publisher, iBUG (indoor/outdoor, 600 faces), in 4 parts",
            tuple(RemoteFile(f"300w.zip.00{i}", (f"{IBUG}300w.zip.00{i}",)) for i in range(1, 5)),
            page="https://ibug.doc.ic.ac.uk/resources/300-W/", join="300w.zip", use="ibug-pts:300W",
            notes="iBUG asks for a form (name, e-mail, affiliation) before serving these files; "
                  "if the server answers with that form, download the parts in a browser into --to "
                  "and run the command again: it verifies, joins and extracts what is there."),
    Dataset("300w-subsets", "the 300-W training subsets from iBUG: afw, helen, ibug, lfpw (.jpg/.png + .pts)",
            tuple(RemoteFile(f"{n}.zip", (f"{IBUG}{n}.zip",)) for n in ("afw", "helen", "ibug", "lfpw")),
            page="https://ibug.doc.ic.ac.uk/resources/facial-point-annotations/", use="ibug-pts:helen",
            notes="Same registration form as 300w."),
    Dataset("wflw-annotations", "WFLW 98-point annotations (train/test lists with boxes and attributes)",
            (RemoteFile("WFLW_annotations.tar.gz",
                        ("https://wywu.github.io/projects/LAB/support/WFLW_annotations.tar.gz",)),),
            page="https://wywu.github.io/projects/LAB/WFLW.html",
            use="wflw:WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt",
            notes="The images (WFLW_images.tar.gz) are only on Google Drive (file id "
                  "1hzBd48JIdWTJSsATBEB_eFVvPL1bx6UC) behind a confirmation page: fetch them in a "
                  "browser and extract them into the same --to folder."),
    Dataset("aflw2000-3d", "AFLW2000-3D: 2,000 faces with fitted 68-point 3-D landmarks and head pose",
            (RemoteFile("AFLW2000-3D.zip",
                        ("http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/Database/AFLW2000-3D.zip",)),),
            page="http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/main.htm", use="aflw2000:AFLW2000"),
    Dataset("udacity-keypoints", "the Udacity facial-keypoints set (YouTube Faces frames, 68 points), "
                                 "as used by udacity/P1_Facial_Keypoints",
            (RemoteFile("train-test-data.zip",
                        ("https://s3.amazonaws.com/video.udacity-data.com/topher/2018/May/"
                         "5aea1b91_train-test-data/train-test-data.zip",)),),
            page="https://github.com/udacity/P1_Facial_Keypoints",
            use="udacity:training_frames_keypoints.csv",
            notes="The archive holds training/ and test/ image folders beside "
                  "training_frames_keypoints.csv and test_frames_keypoints.csv."),
)}


def get_dataset(name: str) -> Dataset:
    if name not in CATALOGUE:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(CATALOGUE)}",
                         example="flm data download aflw2000-3d --to data/")
    return CATALOGUE[name]


def file_urls(ds: Dataset, f: RemoteFile, mirror: str | None) -> tuple[str, ...]:
    """The provider's URLs, or `MIRROR/NAME/FILE` when a mirror is given."""
    if mirror:
        return (f"{mirror.rstrip('/')}/{ds.name}/{f.name}",)
    return f.urls


# --------------------------------------------------------------------------- download


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


Progress = Callable[[str, int, Optional[int]], None]  # (file name, bytes so far, total or None)


def fetch_file(f: RemoteFile, urls, dest_dir: Path, expected_sha256: str | None = None,
               progress: Progress | None = None) -> Path:
    """Download one file to `dest_dir/f.name` through `f.name.part`, resuming a partial one."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / f.name, dest_dir / (f.name + ".part")
    expected = (expected_sha256 or f.sha256 or "").lower() or None
    if final.is_file():
        if expected is None or sha256_of(final) == expected:
            log.info("%s: already there%s", final, ", checksum verified" if expected else "")
            return final
        kept = final.with_name(f.name + ".bad")
        replace(final, kept)
        log.warning("%s: checksum does not match; moved to %s and downloading again", final, kept)
    unreachable = []
    for url in urls:
        try:
            _transfer(url, part, f.name, progress)
            break
        except NetworkUnavailable as e:
            unreachable.append(str(e))
    else:
        raise NetworkUnavailable(unreachable[-1] if len(unreachable) == 1 else "; ".join(unreachable))
    size = part.stat().st_size
    actual = sha256_of(part)
    problem = (f.size is not None and size != f.size) or (expected is not None and actual != expected)
    if problem:
        kept = dest_dir / (f.name + ".bad")
        replace(part, kept)
        if expected is not None and actual != expected:
            raise ChecksumMismatch(final, expected, actual, kept)
        raise DownloadError(f"{f.name}: got {size:,} bytes, expected {f.size:,}; kept as {kept} (not used)")
    replace(part, final)
    return final


def _open(url: str, offset: int):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to send: the .part may already be whole
            return e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        host = urllib.parse.urlsplit(url).netloc
        raise NetworkUnavailable(f"cannot reach {host} to download {url.rsplit('/', 1)[-1]} ({reason}); "
                                 "check the network, or point --mirror / FLM_DATA_MIRROR at a copy") from None


def _transfer(url: str, part: Path, name: str, progress: Progress | None) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    resp = _open(url, offset)
    with resp:
        status = resp.getcode()
        if status == 416:
            m = re.match(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                return  # the .part is complete
            remove(part)  # the .part is longer than the file: start again
            return _transfer(url, part, name, progress)
        ctype = resp.headers.get("Content-Type", "")
        if ctype.startswith("text/html") and not name.endswith((".html", ".htm")):
            raise DownloadError(f"{url}: the server sent a web page instead of {name} (a login or "
                                "registration form?); download it in a browser into --to and run again")
        if status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise DownloadError(f"{url}: asked for bytes from {offset:,}, the server sent "
                                    f"{resp.headers.get('Content-Range')!r}")
            mode = "ab"
            log.info("%s: resuming at %.1f MB", name, offset / 1e6)
        else:  # 200: the server sends the whole file (it ignored or did not get a Range)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        with open(part, mode) as out:
            try:
                while block := resp.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(name, done, total)
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{name}: download interrupted after {done / 1e6:.1f} MB ({e}); "
                                    "run the same command again to resume") from None
    if total is not None and done < total:
        raise DownloadError(f"{name}: the connection closed after {done:,} of {total:,} bytes; "
                            "run the same command again to resume")


# --------------------------------------------------------------------------- extraction


def _check_name(archive, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or re.match(r"^[A-Za-z]:", name) or name.startswith("/"):
        raise UnsafeArchive(archive, name, "absolute path")
    if ".." in p.parts:
        raise UnsafeArchive(archive, name, "'..' in the path leads outside the target folder")


def check_tar(archive, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            raise UnsafeArchive(archive, m.name, f"a {'symbolic' if m.issym() else 'hard'} link "
                                                 f"(to {m.linkname!r}); flm extracts no links")
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchive(archive, m.name, "a device file or FIFO")
    return members


def check_zip(archive, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for m in members:
        _check_name(archive, m.filename)
        kind = stat.S_IFMT(m.external_attr >> 16)  # made on Unix: the high bits are a st_mode
        if m.create_system == 3 and kind:  # (some writers set permission bits only: a file)
            if kind == stat.S_IFLNK:
                raise UnsafeArchive(archive, m.filename, "a symbolic link; flm extracts no links")
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchive(archive, m.filename, "a device file or FIFO")
    return members


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Check every member, then extract into a temporary folder inside `dest` and move the
    top-level entries into place. Returns those entries' names."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".{archive.name}.extracting"
    remove(staging)
    staging.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for m in check_zip(archive, zf):
                    zf.extract(m, staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(staging, members=check_tar(archive, tf), filter="data")
        else:
            raise DownloadError(f"{archive}: neither a zip nor a tar archive")
        names = sorted(p.name for p in staging.iterdir())
        for n in names:
            replace(staging / n, dest / n)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DownloadError(f"{archive}: damaged archive ({e})") from None
    finally:
        remove(staging)
    return names


def join_parts(parts: list[Path], out: Path) -> Path:
    with atomic_path(out) as tmp, open(tmp, "wb") as w:
        for p in parts:
            with open(p, "rb") as r:
                while block := r.read(CHUNK):
                    w.write(block)
    return out


# --------------------------------------------------------------------------- one dataset


def download_dataset(ds: Dataset, to: Path, mirror: str | None = None, verify: bool = True,
                     sha256: str | None = None, extract: bool = True,
                     progress: Progress | None = None) -> dict:
    """Download, verify and extract `ds` into `to`. Returns {file: sha256, ..., "extracted": [...]}."""
    to = Path(to)
    if sha256 is not None:
        if len(ds.files) != 1:
            raise UsageError(f"--sha256 names one file's checksum but {ds.name} has {len(ds.files)} files",
                             example=f"flm data download {ds.name} --to {to} --no-verify")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise UsageError(f"--sha256 {sha256!r}: expected 64 hexadecimal digits",
                             example=f"flm data download {ds.name} --to {to} --sha256 " + "0123abcd" * 8)
    unknown = [f.name for f in ds.files if f.sha256 is None and sha256 is None]
    if verify and unknown:
        raise UsageError(f"{ds.name}: no trusted SHA-256 is known for {', '.join(unknown)} (the provider "
                         "publishes none), so the download could not be verified. Pass --sha256 HEX from a "
                         "source you trust, or --no-verify to download it anyway (its SHA-256 is printed "
                         f"and recorded in {to / MANIFEST} so you can pin it)",
                         example=f"flm data download {ds.name} --to {to} --no-verify")
    result, manifest = {}, _read_manifest(to)
    for f in ds.files:
        expected = sha256 or f.sha256
        path = fetch_file(f, file_urls(ds, f, mirror), to, expected, progress)
        digest = sha256_of(path)
        result[f.name] = digest
        manifest.setdefault(ds.name, {})[f.name] = {
            "url": file_urls(ds, f, mirror)[0], "bytes": path.stat().st_size, "sha256": digest,
            "verified": expected is not None, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_manifest(to, manifest)
    if extract and ds.extract:
        if ds.join:  # one archive split in pieces
            result["extracted"] = safe_extract(join_parts([to / f.name for f in ds.files], to / ds.join), to)
        else:
            result["extracted"] = [n for f in ds.files for n in safe_extract(to / f.name, to)]
    return result


def _read_manifest(to: Path) -> dict:
    try:
        return json.loads((to / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(to: Path, manifest: dict) -> None:
    with atomic_path(to / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------- command


def register(data_app: typer.Typer) -> None:
    data_app.command("download")(download)


def download(name: Optional[str] = typer.Argument(None, help="Dataset name; leave out to list them."),
             to: Optional[Path] = typer.Option(None, "--to", help="Folder to download and extract into."),
             mirror: Optional[str] = typer.Option(None, "--mirror", envvar="FLM_DATA_MIRROR",
                                                  help="Fetch URL/NAME/FILE instead of the provider's address."),
             no_verify: bool = typer.Option(False, "--no-verify", help="Download even without a known SHA-256 "
                                            "(the one received is printed and recorded)."),
             sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 of a one-file dataset."),
             no_extract: bool = typer.Option(False, "--no-extract", help="Download and verify only.")):
    """Download a public landmark dataset with checksum verification and safe extraction."""
    if name is None:
        _print_catalogue()
        return
    ds = get_dataset(name)
    if to is None:
        raise UsageError("--to DIR is required", example=f"flm data download {name} --to data/{name}")
    started = time.perf_counter()
    result = _download_with_progress(ds, to, mirror=mirror, verify=not no_verify, sha256=sha256,
                                     extract=not no_extract)
    _print_result(ds, to, result, sha256, started)


def _print_catalogue() -> None:
    """`flm data download` without a name: the datasets it can fetch."""
    from rich.table import Table

    from flm.ui import out

    t = Table(title="datasets flm can download (flm data download NAME --to DIR)")
    t.add_column("name", no_wrap=True)
    for col in ("what", "files", "size", "SHA-256", "read it as"):
        t.add_column(col, overflow="fold")
    for d in CATALOGUE.values():
        known = sum(f.sha256 is not None for f in d.files)
        t.add_row(d.name, d.title, str(len(d.files)), d.approx_size or "unknown",
                  f"{known}/{len(d.files)} known" if known else "[yellow]not published",
                  d.use.replace(":", ":DIR/", 1) if d.use else "-")
    out.print(t)


def _download_with_progress(ds: Dataset, to: Path, **options) -> dict:
    """`download_dataset` with one progress bar per file on a terminal."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from flm.ui import console

    with Progress(TextColumn("{task.fields[file]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks = {}

        def progress(file, done, total):
            if file not in tasks:
                tasks[file] = bar.add_task(file, file=file, total=total)
            bar.update(tasks[file], completed=done, total=total)

        return download_dataset(ds, to, progress=progress, **options)


def _print_result(ds: Dataset, to: Path, result: dict, sha256: str | None, started: float) -> None:
    """What was downloaded (sizes, checksums, whether verified), extracted, and how to read it."""
    from flm.ui import console, out

    say = lambda text: out.print(text, soft_wrap=True, highlight=False)  # noqa: E731  (hashes whole)
    say(f"{ds.name} -> {to} in {time.perf_counter() - started:.0f} s")
    for f in ds.files:
        verified = "verified" if sha256 or f.sha256 else "[yellow]NOT verified (--no-verify): pin it with --sha256[/]"
        say(f"  {f.name}  {(to / f.name).stat().st_size:,} bytes  sha256 {result[f.name]}  {verified}")
    if "extracted" in result:
        say(f"extracted: {', '.join(result['extracted'])}")
    if ds.use:
        fmt, _, rel = ds.use.partition(":")
        if (to / rel).exists():
            say(f"read it as {fmt}:{to / rel}")
        else:
            say(f"read it with the {fmt} format (expected {to / rel}, which is not there yet; "
                "see `flm data formats`)")
    if ds.notes:
        console.print(f"note: {ds.notes}", highlight=False)
