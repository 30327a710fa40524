"""``splitinfer-serve`` in a subprocess on 127.0.0.1, for tests that kill it, restart it or measure its memory."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTENING = re.compile(r"^splitinfer-serve: listening on (\S+):(\d+)$")
STARTUP_TIMEOUT_S = 60.0


class ServeProcess:
    """One ``splitinfer-serve --model DIR`` process; stderr (the log) goes to ``log_path``.

    ``start()`` returns once the server prints its listening line (it accepts calls from then on);
    ``started_at`` is that moment (``time.monotonic()``). ``port`` 0 picks a free port; a restart
    after ``kill()`` reuses the port the first start got.
    """

    def __init__(self, model_dir: Path, log_path: Path, port: int = 0, args: tuple[str, ...] = ()) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.port = port
        self.args = tuple(args)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.stdout_lines: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServeProcess":
        if self.alive:
            raise RuntimeError("the server is already running")
        command = [sys.executable, "-m", "splitinfer.cloud.cli", "--model", str(self.model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, bufsize=0,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                break
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            match = LISTENING.match(line.rstrip("\n"))
            if match:
                self.started_at = time.monotonic()
                self.port = int(match.group(2))
                return self
            self.stdout_lines.append(line)
        self.kill()
        raise RuntimeError(f"splitinfer-serve did not start within {timeout} s; stdout {self.stdout_lines!r}; "
                           f"log:\n{self.log_path.read_text()[-4000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server was never started")
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to drain or say goodbye."""
        self._end(signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain); returns the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def _end(self, signum: int, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start() if not self.alive else self

    def __exit__(self, *exc_info) -> None:
        self.kill()
