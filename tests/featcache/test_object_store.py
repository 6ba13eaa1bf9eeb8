"""Feature stores on an object store (issue 24), against a real S3 API server the tests start
on 127.0.0.1 (moto's, ``tests/s3_server.py``): extract to s3://, fit from it, predict from it,
kill an extract and resume it, two writers (the second refused); each result byte-identical to
the same steps on a local store. Without credentials, endpoint or bucket: one line, no
traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg.cli.main import cli
from ddpmseg.core import locking, objectstore
from ddpmseg.core.errors import StoreAccessError
from ddpmseg.featcache import FeatureStore

from tests.s3_server import MotoServer, free_port, need_s3

CONFIG = "faces64_ffhq_34"  # the bundled backbone, 64 px


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    need_s3()
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto, monkeypatch) -> str:
    """s3://<a fresh bucket>, with the server's credentials and endpoint in the environment
    (inherited by subprocesses)."""
    import s3fs

    for key, value in moto.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # none made for another server's endpoint
    return f"s3://{moto.new_bucket()}"


def run(*argv) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code == 0, f"ddpmseg {' '.join(map(str, argv))}\n{result.output}"
    return result.stdout


def download(url: str, dest: Path) -> Path:
    """A local copy of the objects under ``url`` (to compare byte for byte)."""
    fs, path = objectstore.filesystem(url)
    fs.invalidate_cache()
    for key in fs.find(path):
        target = dest / key[len(path):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(key))
    return dest


def keys(url: str) -> list[str]:
    fs, path = objectstore.filesystem(url)
    fs.invalidate_cache()
    bucket = path.split("/")[0]
    return sorted(k[len(bucket) + 1:] for k in fs.find(bucket))


# -- the lock ---------------------------------------------------------------------------------

def test_the_server_enforces_conditional_puts(s3):
    """What the lock is made of: of two creates, one wins; a replace on a stale ETag fails."""
    fs, key = objectstore.filesystem(f"{s3}/.x.zarr.lock")
    assert objectstore.create_object(fs, key, b"first")
    assert not objectstore.create_object(fs, key, b"second")
    data, tag = objectstore.read_tagged(fs, key)
    assert data == b"first"
    assert objectstore.replace_object(fs, key, b"third", tag)
    assert not objectstore.replace_object(fs, key, b"fourth", tag)  # tag now stale
    assert objectstore.read_tagged(fs, key)[0] == b"third"


def lock_record(**fields) -> bytes:
    record = {"owner": "elsewhere:1", "host": "elsewhere", "pid": 1, "token": "t",
              "ttl_s": 600, "expires": time.time() + 600}
    return json.dumps({**record, **fields}).encode()


def test_a_second_writer_is_refused_and_the_lock_goes_at_the_end(s3):
    store = f"{s3}/x.zarr"
    fs, key = objectstore.filesystem(locking.object_lock_url(store))
    assert key.endswith("/.x.zarr.lock")  # beside the store, not inside it
    with locking.writer_lock(store, "store"):
        held = json.loads(objectstore.read_tagged(fs, key)[0])
        assert held["pid"] == os.getpid() and held["expires"] > time.time()
        with pytest.raises(locking.LockedError, match=r"is being written by .*:%d \(lock object"
                           % os.getpid()):
            with locking.writer_lock(store, "store"):
                pass
    assert objectstore.read_tagged(fs, key) is None
    with locking.writer_lock(store, "store"):  # free again
        pass


@pytest.mark.parametrize("holder, taken", [
    ({"expires": time.time() - 1}, True),                      # expired
    ({"host": None, "pid": 2 ** 22 + 7}, None),                # this host's, process gone
    ({}, False),                                               # another host's, live
])
def test_a_dead_writers_lock_is_taken_over_a_live_one_is_not(s3, holder, taken):
    import socket

    if taken is None:  # a process of this host that no longer runs
        holder = {**holder, "host": socket.gethostname()}
        taken = True
    store = f"{s3}/x.zarr"
    fs, key = objectstore.filesystem(locking.object_lock_url(store))
    fs.pipe_file(key, lock_record(**holder))
    if taken:
        with locking.writer_lock(store, "store"):
            assert json.loads(objectstore.read_tagged(fs, key)[0])["pid"] == os.getpid()
        assert objectstore.read_tagged(fs, key) is None
    else:
        with pytest.raises(locking.LockedError, match="elsewhere:1"):
            with locking.writer_lock(store, "store"):
                pass
        assert json.loads(objectstore.read_tagged(fs, key)[0])["owner"] == "elsewhere:1"


@pytest.mark.slow
def test_a_second_extract_is_refused_in_one_line(s3, two_faces):
    """Two writers: a CLI extract while another process holds the store's lock."""
    store = f"{s3}/x.zarr"
    with locking.writer_lock(store, "store"):
        proc = subprocess.run([sys.executable, "-c", "from ddpmseg.cli import main; main()",
                               "extract", str(two_faces), store, "--config", CONFIG],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: store {store} is being written by ") and "wait for" in line
    assert keys(s3) == []  # nothing written


# -- access errors ------------------------------------------------------------------------------

def _cli_line(env: dict, *argv) -> str:
    proc = subprocess.run([sys.executable, "-c", "from ddpmseg.cli import main; main()",
                           *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize("case", ["credentials", "endpoint", "bucket"])
def test_an_unreachable_object_store_is_one_line(s3, moto, case):
    env = {**os.environ}
    url = f"{s3}/x.zarr"
    if case == "credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        want = "error: no object-store credentials for s3://"
    elif case == "endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens
        env["AWS_MAX_ATTEMPTS"] = "1"  # botocore's retries would only take longer
        want = "error: cannot reach the object store for s3://"
    else:
        url = "s3://no-such-bucket-here/x.zarr"
        want = "error: bucket no-such-bucket-here does not exist"
    line = _cli_line(env, "verify", url)
    assert line.startswith(want), line
    assert ("create it" if case == "bucket" else "AWS_ENDPOINT_URL") in line, line


def test_a_store_that_is_not_there_is_named_so(s3):
    from ddpmseg.core.errors import StoreError

    with pytest.raises(StoreError, match=r"s3://.*/none\.zarr does not exist; run `ddpmseg "
                                         r"extract`"):
        FeatureStore.open(f"{s3}/none.zarr")


def test_access_problems_are_store_access_errors(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreAccessError, match="no object-store credentials"):
        FeatureStore.open(f"{s3}/x.zarr")


# -- the stages, byte-identical to a local store ------------------------------------------------

def _prediction(folder: Path) -> dict[str, bytes]:
    # predict.json records the input's path and timings: the rest must be equal bytes.
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "predict.json"}


@pytest.mark.slow
def test_extract_fit_predict_on_s3_equal_local(s3, two_faces, tmp_path, helpers, one_thread):
    import torch

    url, local = f"{s3}/faces.zarr", tmp_path / "faces.zarr"
    for store, name in ((url, "s3"), (local, "local")):
        run("extract", two_faces, store, "--config", CONFIG)
        run("fit", store, tmp_path / f"run_{name}", "--ensemble", 2, "--max-epochs", 1)
        run("predict", tmp_path / f"run_{name}", store, tmp_path / f"pred_{name}")
    assert FeatureStore.open(url).complete().all()
    copied = helpers.tree_bytes(download(url, tmp_path / "copy.zarr"))
    assert copied == helpers.tree_bytes(local)
    assert keys(s3) == sorted(f"faces.zarr/{k}" for k in copied)  # the lock object is gone
    for k in range(2):
        a, b = (torch.load(tmp_path / f"run_{n}" / f"member_{k:02d}.pt", weights_only=False)
                for n in ("s3", "local"))
        assert all(torch.equal(a["state_dict"][p], b["state_dict"][p]) for p in b["state_dict"])
    assert _prediction(tmp_path / "pred_s3") == _prediction(tmp_path / "pred_local")
    meta = json.loads((tmp_path / "pred_s3" / "predict.json").read_text())
    assert meta["input"] == url  # the URL, not the local path "s3:/..."
    # suggest, verify and evaluate read it too
    assert "the store is sound" in run("verify", url)
    assert len(run("suggest", tmp_path / "run_s3", url, "--include-labelled",
                   "--out", tmp_path / "sugg").splitlines()) >= 2
    for name, store in (("s3", url), ("local", local)):
        run("evaluate", tmp_path / f"pred_{name}", store)
    metrics = [json.loads((tmp_path / f"pred_{n}" / "metrics.json").read_text())
               for n in ("s3", "local")]
    assert metrics[0]["miou"] == metrics[1]["miou"] and metrics[0]["classes"] == \
        metrics[1]["classes"]


@pytest.mark.slow
def test_a_killed_extract_to_s3_resumes_byte_identical(s3, faces, faces64_ckpt, tmp_path,
                                                       helpers):
    from tests.featcache.test_fc_resume import SCRIPT, count_complete
    from tests.featcache.test_fc_resume import run as start

    folder = helpers.make_folder(tmp_path / "data", [f[1] for f in faces],
                                 [f[2] for f in faces], [f[0] for f in faces])
    script = tmp_path / "run_extract.py"
    script.write_text(SCRIPT)
    url, full = f"{s3}/killed.zarr", tmp_path / "full.zarr"
    # Shards of 2 images (format 3): whole shards reach the bucket as the run goes.
    helpers.sigkill_when(start(script, [folder, url, faces64_ckpt, 0.6, 2]),
                         lambda: count_complete(url) >= 2)
    done_at_kill = count_complete(url)
    assert 2 <= done_at_kill < len(faces), "the kill came too late to test resumption"
    # The killed writer's lock object is left; the rerun on this host takes it over.
    assert f"{url[len(s3) + 1:].replace('killed', '.killed')}.lock" in keys(s3)
    for path in (url, full):
        proc = start(script, [folder, path, faces64_ckpt, 0, 2])
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert FeatureStore.open(url).complete().all()
    resumed = helpers.tree_bytes(download(url, tmp_path / "copy.zarr"))
    uninterrupted = helpers.tree_bytes(full)
    assert sorted(resumed) == sorted(uninterrupted)
    assert [k for k in resumed if resumed[k] != uninterrupted[k]] == []
    assert np.array_equal(FeatureStore.open(url).maps(0)[0], FeatureStore.open(full).maps(0)[0])


@pytest.mark.slow
def test_readme_object_store_commands_run_as_written(moto, s3, two_faces, tmp_path,
                                                     monkeypatch, one_thread):
    """README's object-store section, its ddpmseg lines as written (the exports are the
    fixture's environment), on the bucket it names."""
    import shutil

    from tests.test_readme import README_SECTION_RUNNERS

    section, bash_blocks, commands, run_line = README_SECTION_RUNNERS
    lines = [c for block in bash_blocks(section("## Feature stores on S3 and other object "
                                                "stores")) for c in commands(block)]
    assert any(" s3://my-bucket/" in line for line in lines), lines
    fs, _ = objectstore.filesystem("s3://my-bucket")
    if not fs.exists("my-bucket"):
        fs.mkdir("my-bucket")
    shutil.copytree(two_faces, tmp_path / "data" / "train")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        run_line(line)
    assert (tmp_path / "preds" / "s3" / "predict.json").is_file()


# -- the lock on any fsspec store (memory://: no server needed) ---------------------------------

def test_the_lock_on_a_memory_store_refuses_a_second_writer():
    store = "memory://lock-test/x.zarr"
    with locking.writer_lock(store, "store"):
        with pytest.raises(locking.LockedError, match="is being written by"):
            with locking.writer_lock(store, "store"):
                pass
    fs, key = objectstore.filesystem(locking.object_lock_url(store))
    assert not fs.exists(key)


class _Ticks:
    """A stop event whose wait says "go on" ``n`` times, then "stop" (no real waiting)."""

    def __init__(self, n: int):
        self.n = n

    def wait(self, timeout):
        self.n -= 1
        return self.n < 0


def test_the_holder_renews_its_lock_and_leaves_a_taken_one(caplog):
    store = "memory://renew-test/x.zarr"
    fs, key = objectstore.filesystem(locking.object_lock_url(store))
    record = {"owner": "me", "host": "h", "pid": 1, "token": "mine", "ttl_s": 600.0}
    assert objectstore.create_object(fs, key, locking._lock_bytes(record))
    data, tag = objectstore.read_tagged(fs, key)
    first = json.loads(data)["expires"]
    record["ttl_s"] = 1200.0  # the next renewal pushes the expiry 20 minutes on
    locking._renew_object_lock(fs, key, record, tag, _Ticks(1))
    assert json.loads(objectstore.read_tagged(fs, key)[0])["expires"] > first + 500
    fs.pipe_file(key, lock_record(token="theirs"))  # taken over meanwhile
    locking._renew_object_lock(fs, key, record, tag, _Ticks(1))
    assert json.loads(objectstore.read_tagged(fs, key)[0])["token"] == "theirs"
    assert "was taken over by another writer" in caplog.text


def test_a_store_url_stays_a_url_on_the_way_to_predict():
    """predict and suggest took s3://b/x.zarr for the local path s3:/b/x.zarr (issue 24)."""
    from ddpmseg.pipelines.predict import input_path

    assert input_path("s3://b/x.zarr") == "s3://b/x.zarr"
    assert input_path(type("Opened", (), {"path": "memory://x.zarr"})()) == "memory://x.zarr"
