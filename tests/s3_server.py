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
import sys
import uuid
from pathlib import Path

from tests.helpers import need
from tests.local_server import LocalServer, free_port  # noqa: F401 - free_port: the tests' one


def need_s3() -> None:
    """Skip (fail under CI=true) without moto's server or s3fs."""
    for module, package in (("moto", "moto[s3]"), ("flask", "flask"), ("flask_cors", "flask-cors"),
                            ("s3fs", "s3fs")):
        if importlib.util.find_spec(module) is None:
            need(f"{package} is not installed (pip install -e '.[test]')")


class MotoServer(LocalServer):
    name = "moto"
    health = "/moto-api/"

    def __init__(self, root: Path):
        port = free_port()
        super().__init__([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         port, root / "moto.log")

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
