"""Real servers the tests start on 127.0.0.1 and a free port and stop by their process id:
moto's S3 server (``tests/s3_server.py``) and Label Studio
(``tests/interop/label_studio_server.py``). Each runs in a process group of its own, with its
output in a log file that an error quotes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A server process: ``cmd`` started with its output in ``log``; ready once ``health`` (a
    path under its URL) answers. Subclasses set the class attributes."""

    name = "server"
    health = "/"
    start_seconds = 60.0
    poll_seconds = 0.2
    stop_seconds = 30.0

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): "
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.health}", timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(self.poll_seconds)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer in {self.start_seconds:.0f} s: "
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to its process group (it leads its own), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
