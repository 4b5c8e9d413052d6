"""Shared by the reliability tests: `flm` as a real subprocess, and small fixture files."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
FLM = [sys.executable, "-m", "flm.cli"]
# One torch thread per process: on a small shared machine two threads per process spend most of
# their time waiting for each other (measured here: 9 s vs 0.07 s per 64-px training step).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
# a tiny but real training run: 48 synthetic faces (12 people), 64-px crops, 10 steps an epoch
TRAIN = ["train", "--synthetic-n", "48", "--img-size", "64", "--workers", "0", "--batch-size", "4",
         "--seed", "3"]


def flm(*args, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*FLM, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=cwd)


class Flm:
    """A running `flm` subprocess whose stderr is collected line by line as it comes."""

    def __init__(self, *args, cwd=None):
        self.proc = subprocess.Popen([*FLM, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV, cwd=cwd)
        self.lines: list[str] = []
        self._out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(f, to), daemon=True)
                         for f, to in ((self.proc.stderr, self.lines), (self.proc.stdout, self._out))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"never saw {text!r} (exit {self.proc.poll()}):\n{self.stderr}")
            time.sleep(0.02)

    def wait(self, timeout: float = 300) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for t in self._readers:
            t.join(10)
        return self.proc.returncode


# --------------------------------------------------------------------------- fixture files


# the fixture writers of the loader tests, shared (same 120x100 default image)
from tests.test_data_formats import png_chunk, write_image  # noqa: E402,F401



def bomb_header(path: Path, side=20000) -> Path:
    """Only the first bytes of a PNG claiming side x side pixels: the check must need no pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)))
    return path


def face_points(seed=0, n=68, w=120, h=100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(5, w - 5, n), rng.uniform(5, h - 5, n)]).round(2)
