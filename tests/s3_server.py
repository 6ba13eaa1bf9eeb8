"""A real S3 API server for tests: moto's server (``python -m moto.server``) on 127.0.0.1 and
a free port, started by the tests and stopped by its process id (issue 24).

moto's server enforces conditional puts (``If-None-Match: *`` and ``If-Match``), which the
object-store writer lock is made of. Its S3 needs ``moto[s3]`` plus flask and flask-cors (the
``test`` extra); ``moto[server]`` would pull every AWS service's dependencies. Without moto or
s3fs the tests skip, saying so, except under CI=true, where they fail (``tests.helpers.need``).

``s3_env(server)`` is the environment a client needs: credentials and ``AWS_ENDPOINT_URL``,
the variables botocore reads, and no shared config or instance metadata from the host.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.helpers import need
from tests.interop.label_studio_server import free_port  # noqa: F401 - the tests' one

START_SECONDS = 60


def need_s3() -> None:
    """Skip (fail under CI=true) without moto's server or s3fs."""
    for module, package in (("moto", "moto[s3]"), ("flask", "flask"), ("flask_cors", "flask-cors"),
                            ("s3fs", "s3fs")):
        if importlib.util.find_spec(module) is None:
            need(f"{package} is not installed (pip install -e '.[test]')")


class MotoServer:
    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited ({self.proc.returncode}): "
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"moto did not answer in {START_SECONDS} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def new_bucket(self) -> str:
        """A fresh bucket (each test its own), made through s3fs with the server's env."""
        import s3fs

        name = f"b{uuid.uuid4().hex[:12]}"
        env = self.env()
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=self.url, skip_instance_cache=True)
        fs.mkdir(name)
        return name
