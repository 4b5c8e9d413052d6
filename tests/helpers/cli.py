"""`flm` as a real subprocess, as a shell runs it (the reliability, recipe and multi-source tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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
