"""A real Label Studio for tests: started from its own venv (``DDPMSEG_LABEL_STUDIO``: the path
of its ``label-studio`` executable) on 127.0.0.1 and a free port, with SQLite and its data in a
temporary folder, a preset user and API token; stopped by its process id.

What was found to work (issue 23): ``--internal-host 127.0.0.1`` (the default binds 0.0.0.0);
the user and token preset through LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN with
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true; images served from local files with
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED plus a local import storage on the project; SENTRY_DSN
empty to keep it quiet. Its first start runs migrations (about a minute).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from tests.local_server import LocalServer, free_port

ENV_VAR = "DDPMSEG_LABEL_STUDIO"
TOKEN = "ddpmseg0test0token0abcdef0123456789abcdef"
USER, PASSWORD = "labeller@example.com", "ddpmseg-test-password"
START_SECONDS = 600  # first start: migrations; a loaded CI machine is slow


class LabelStudio(LocalServer):
    name = "label-studio"
    health = "/health"
    start_seconds = START_SECONDS
    poll_seconds = 1.0

    def __init__(self, executable: str, root: Path, files_root: Path):
        port = free_port()
        data = root / "label-studio"
        data.mkdir(parents=True)
        env = {**os.environ, "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
               "LABEL_STUDIO_USERNAME": USER, "LABEL_STUDIO_PASSWORD": PASSWORD,
               "LABEL_STUDIO_USER_TOKEN": TOKEN,
               "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
               "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
               "LABEL_STUDIO_BASE_DATA_DIR": str(data), "DJANGO_DB": "sqlite",
               "COLLECT_ANALYTICS": "false", "PYTHONWARNINGS": "ignore"}
        cmd = [executable, "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(port), "--data-dir", str(data),
               "--database", str(data / "label_studio.sqlite3"),
               "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
               "--enable-legacy-api-token", "--log-level", "WARNING"]
        super().__init__(cmd, port, root / "label-studio.log", env)

    def api(self, method: str, path: str, body=None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Authorization": f"Token {TOKEN}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                content = r.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from exc
        return content if raw else (json.loads(content) if content else None)
