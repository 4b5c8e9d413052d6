"""`flm data download` against a real HTTP server on 127.0.0.1 (never a remote host).

The server is a small http.server handler that serves fixture archives built by the tests,
honours `Range: bytes=N-` with 206 / Content-Range (like the providers' servers), and can be
told to cut a transfer short, ignore Range, or answer with an HTML page.
"""

import hashlib
import io
import json
import re
import socket
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flm.cli import main
from flm.errors import UsageError
from flm.pipeline.data.download import (CATALOGUE, ChecksumMismatch, Dataset, DownloadError, NetworkUnavailable,
                                        RemoteFile, UnsafeArchive, download_dataset, safe_extract)


# --------------------------------------------------------------------------- the local server


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.cut_after: int | None = None  # send only this many bytes of the next response, then close
        self.ignore_range = False
        self.html = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if server.html else "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[:server.cut_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- fixture archives


def tar_bytes(members) -> bytes:
    """members: (TarInfo-like kwargs, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for kw, data in members:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def zip_bytes(members) -> bytes:
    """members: (name, data, unix mode or None)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def good_tar() -> bytes:
    rng = __import__("random").Random(0)
    big = bytes(rng.getrandbits(8) for _ in range(300_000))  # incompressible: the transfer has length
    return tar_bytes([({"name": "AFLW2000", "type": tarfile.DIRTYPE}, None),
                      ({"name": "AFLW2000/image00002.jpg"}, big),
                      ({"name": "AFLW2000/image00002.mat"}, b"pose")])


def one_file(name: str, sha: str | None = None, size: int | None = None, ds_name="fixture") -> Dataset:
    return Dataset(ds_name, "a fixture", (RemoteFile(name, ("http://example.invalid/never-used",), sha, size),),
                   page="-", use="aflw2000:AFLW2000")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- downloads


def test_good_archive_is_verified_and_extracted(server, tmp_path):
    data = good_tar()
    server.files["/fixture/a.tar.gz"] = data
    to = tmp_path / "data"
    result = download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert result["a.tar.gz"] == sha(data) and result["extracted"] == ["AFLW2000"]
    assert (to / "AFLW2000" / "image00002.mat").read_bytes() == b"pose"
    assert (to / "a.tar.gz").read_bytes() == data
    assert not list(to.glob("*.part")) and not list(to.glob(".*extracting"))
    manifest = json.loads((to / ".flm-downloads.json").read_text())
    assert manifest["fixture"]["a.tar.gz"]["sha256"] == sha(data) and manifest["fixture"]["a.tar.gz"]["verified"]
    # a second run reuses the verified file: no new request
    n = len(server.requests)
    download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert len(server.requests) == n


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = good_tar()
    server.files["/fixture/a.tar.gz"] = data
    server.cut_after = 100_000
    to = tmp_path / "data"
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert (to / "a.tar.gz.part").stat().st_size == 100_000 and not (to / "a.tar.gz").exists()
    download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert server.requests[-1] == ("/fixture/a.tar.gz", "bytes=100000-")  # only the rest was asked for
    assert (to / "a.tar.gz").read_bytes() == data and not (to / "a.tar.gz.part").exists()


def test_a_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    data = good_tar()
    server.files["/fixture/a.tar.gz"] = data
    to = tmp_path / "data"
    to.mkdir()
    (to / "a.tar.gz.part").write_bytes(b"x" * 5000)  # stale partial bytes that are not the file's
    server.ignore_range = True
    download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert server.requests[-1][1] == "bytes=5000-"  # asked, got a 200 with the whole file
    assert (to / "a.tar.gz").read_bytes() == data


def test_a_complete_part_file_is_finished_without_refetching(server, tmp_path):
    data = good_tar()
    server.files["/fixture/a.tar.gz"] = data
    to = tmp_path / "data"
    to.mkdir()
    (to / "a.tar.gz.part").write_bytes(data)  # e.g. killed between the last byte and the rename
    download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert (to / "a.tar.gz").read_bytes() == data


def test_corrupted_archive_fails_the_checksum_and_is_not_used(server, tmp_path):
    data = good_tar()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    server.files["/fixture/a.tar.gz"] = bytes(bad)
    to = tmp_path / "data"
    with pytest.raises(ChecksumMismatch) as e:
        download_dataset(one_file("a.tar.gz", sha(data)), to, mirror=server.url)
    assert e.value.expected == sha(data) and e.value.actual == sha(bytes(bad))
    assert "a.tar.gz.bad" in str(e.value)
    assert listing(to) == {"a.tar.gz.bad"}  # nothing under the real name, nothing extracted
    # the control: the same bytes with the right checksum go through
    download_dataset(one_file("a.tar.gz", sha(bytes(bad))), to, mirror=server.url)
    assert (to / "AFLW2000").is_dir()


def test_wrong_size_is_refused(server, tmp_path):
    data = good_tar()
    server.files["/fixture/a.tar.gz"] = data
    with pytest.raises(DownloadError, match=f"expected {len(data) + 1:,}"):
        download_dataset(one_file("a.tar.gz", sha(data), size=len(data) + 1), tmp_path / "d", mirror=server.url)


def test_an_html_page_instead_of_the_file_is_refused(server, tmp_path):
    server.files["/fixture/a.tar.gz"] = b"<html><form>name, e-mail, affiliation</form></html>"
    server.html = True
    with pytest.raises(DownloadError, match="web page instead of a.tar.gz"):
        download_dataset(one_file("a.tar.gz", "0" * 64), tmp_path / "d", mirror=server.url)


def test_http_404_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/fixture/a.tar.gz: HTTP 404"):
        download_dataset(one_file("a.tar.gz", "0" * 64), tmp_path / "d", mirror=server.url)


def test_unreachable_host_is_network_unavailable(tmp_path):
    port = closed_port()
    with pytest.raises(NetworkUnavailable, match=rf"cannot reach 127.0.0.1:{port} to download a.tar.gz"):
        download_dataset(one_file("a.tar.gz", "0" * 64), tmp_path / "d", mirror=f"http://127.0.0.1:{port}")


# --------------------------------------------------------------------------- unsafe archives


UNSAFE_TARS = {
    "dotdot": [({"name": "ok.txt"}, b"fine"), ({"name": "../evil.txt"}, b"owned")],
    "absolute": [({"name": "/tmp/flm-evil-absolute.txt"}, b"owned")],
    "nested dotdot": [({"name": "a/../../evil.txt"}, b"owned")],
    "symlink escape": [({"name": "link", "type": tarfile.SYMTYPE, "linkname": "../.."}, None),
                       ({"name": "link/evil.txt"}, b"owned")],
    "absolute symlink": [({"name": "passwd", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None)],
    "hardlink escape": [({"name": "h", "type": tarfile.LNKTYPE, "linkname": "../outside.txt"}, None)],
    "device": [({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None)],
}


@pytest.mark.parametrize("case", list(UNSAFE_TARS))
def test_unsafe_tar_is_refused_and_nothing_is_written(tmp_path, case):
    archive = tmp_path / "dl" / "x.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(tar_bytes([(dict(kw), d) for kw, d in UNSAFE_TARS[case]]))
    dest = tmp_path / "dl" / "out"
    before = listing(tmp_path)
    with pytest.raises(UnsafeArchive, match="refusing to extract member"):
        safe_extract(archive, dest)
    assert listing(tmp_path) - before <= {"dl/out"}  # at most the empty target folder
    assert not any(dest.iterdir())
    assert not Path("/tmp/flm-evil-absolute.txt").exists()


UNSAFE_ZIPS = {
    "dotdot": [("ok.txt", b"fine", None), ("../evil.txt", b"owned", None)],
    "absolute": [("/tmp/flm-evil-absolute.txt", b"owned", None)],
    "backslash dotdot": [("..\\evil.txt", b"owned", None)],
    "symlink": [("link", b"../../etc", stat.S_IFLNK | 0o777)],
    "fifo": [("pipe", b"", stat.S_IFIFO | 0o644)],
}


@pytest.mark.parametrize("case", list(UNSAFE_ZIPS))
def test_unsafe_zip_is_refused_and_nothing_is_written(tmp_path, case):
    archive = tmp_path / "dl" / "x.zip"
    archive.parent.mkdir()
    archive.write_bytes(zip_bytes(UNSAFE_ZIPS[case]))
    dest = tmp_path / "dl" / "out"
    before = listing(tmp_path)
    with pytest.raises(UnsafeArchive, match="refusing to extract member"):
        safe_extract(archive, dest)
    assert listing(tmp_path) - before <= {"dl/out"}
    assert not any(dest.iterdir())


def test_safe_zip_with_folders_extracts(tmp_path):
    """The control for the refusals above: an ordinary zip goes through."""
    archive = tmp_path / "x.zip"
    archive.write_bytes(zip_bytes([("AFLW2000/", b"", stat.S_IFDIR | 0o755),
                                   ("AFLW2000/image00002.jpg", b"jpeg", stat.S_IFREG | 0o644),
                                   ("notes.txt", b"hi", None)]))
    assert safe_extract(archive, tmp_path / "out") == ["AFLW2000", "notes.txt"]
    assert (tmp_path / "out" / "AFLW2000" / "image00002.jpg").read_bytes() == b"jpeg"


def test_unsafe_archive_served_over_http_is_refused_after_download(server, tmp_path):
    data = tar_bytes([({"name": "../evil.txt"}, b"owned")])
    server.files["/fixture/a.tar.gz"] = data
    with pytest.raises(UnsafeArchive):
        download_dataset(one_file("a.tar.gz", sha(data)), tmp_path / "d", mirror=server.url)
    assert not (tmp_path / "evil.txt").exists()


def test_parts_are_joined_before_extraction(server, tmp_path):
    whole = zip_bytes([("300W/01_Indoor/indoor_001.pts", b"points", None)])
    cut = len(whole) // 2
    server.files["/split/s.zip.001"], server.files["/split/s.zip.002"] = whole[:cut], whole[cut:]
    ds = Dataset("split", "a split zip", (RemoteFile("s.zip.001", ("-",), sha(whole[:cut])),
                                          RemoteFile("s.zip.002", ("-",), sha(whole[cut:]))),
                 page="-", join="s.zip")
    result = download_dataset(ds, tmp_path / "d", mirror=server.url)
    assert result["extracted"] == ["300W"]
    assert (tmp_path / "d" / "300W" / "01_Indoor" / "indoor_001.pts").read_bytes() == b"points"


# --------------------------------------------------------------------------- the command and the catalogue


def test_catalogue_is_well_formed():
    assert set(CATALOGUE) >= {"300w", "300w-dlib", "wflw-annotations", "aflw2000-3d", "udacity-keypoints"}
    for ds in CATALOGUE.values():
        assert ds.files and len({f.name for f in ds.files}) == len(ds.files)
        for f in ds.files:
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), (ds.name, f.name)
            assert f.urls and all(u.startswith(("http://", "https://")) for u in f.urls)
            assert "/" not in f.name and not f.name.startswith(".")
    assert CATALOGUE["300w-dlib"].files[0].urls == (
        "http://dlib.net/files/data/ibug_300W_large_face_landmark_dataset.tar.gz",)
    assert all(u.startswith("https://ibug.doc.ic.ac.uk/") for f in CATALOGUE["300w"].files for u in f.urls)


def test_cli_downloads_verifies_and_extracts_a_catalogue_dataset(server, tmp_path, capsys):
    data = zip_bytes([("AFLW2000/image00002.jpg", b"jpeg", None)])
    server.files["/aflw2000-3d/AFLW2000-3D.zip"] = data
    to = tmp_path / "data"
    code = main(["data", "download", "aflw2000-3d", "--to", str(to), "--mirror", server.url, "--sha256", sha(data)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sha(data) in out and f"aflw2000:{to / 'AFLW2000'}" in out
    assert (to / "AFLW2000" / "image00002.jpg").read_bytes() == b"jpeg"


def test_cli_mirror_from_the_environment_and_no_verify_records_the_checksum(server, tmp_path, capsys, monkeypatch):
    data = zip_bytes([("AFLW2000/image00002.jpg", b"jpeg", None)])
    server.files["/aflw2000-3d/AFLW2000-3D.zip"] = data
    monkeypatch.setenv("FLM_DATA_MIRROR", server.url)
    to = tmp_path / "data"
    assert main(["data", "download", "aflw2000-3d", "--to", str(to), "--no-verify"]) == 0
    assert "pin it with --sha256" in capsys.readouterr().out
    record = json.loads((to / ".flm-downloads.json").read_text())["aflw2000-3d"]["AFLW2000-3D.zip"]
    assert record["sha256"] == sha(data) and record["verified"] is False


def test_cli_refuses_an_unknown_checksum_before_touching_the_network(tmp_path, capsys):
    port = closed_port()
    code = main(["data", "download", "aflw2000-3d", "--to", str(tmp_path / "d"), "--mirror", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == UsageError.exit_code and "no trusted SHA-256" in err and "--no-verify" in err
    assert "cannot reach" not in err


def test_cli_network_unavailable_is_one_clear_line(tmp_path, capsys):
    port = closed_port()
    code = main(["data", "download", "aflw2000-3d", "--to", str(tmp_path / "d"), "--no-verify",
                 "--mirror", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach 127.0.0.1:"), err
    assert "Traceback" not in err


def test_cli_bad_sha256_and_unknown_name_are_usage_errors(tmp_path, capsys):
    assert main(["data", "download", "aflw2000-3d", "--to", str(tmp_path), "--sha256", "abc"]) == 2
    assert "64 hexadecimal digits" in capsys.readouterr().err
    assert main(["data", "download", "300w", "--to", str(tmp_path), "--sha256", "0" * 64]) == 2
    assert "has 4 files" in capsys.readouterr().err
    assert main(["data", "download", "no-such-set", "--to", str(tmp_path)]) == 2
    assert "known: 300w-dlib" in capsys.readouterr().err


def test_cli_lists_the_catalogue(capsys):
    assert main(["data", "download"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CATALOGUE)
