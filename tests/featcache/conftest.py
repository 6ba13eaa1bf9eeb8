"""Fixtures of the feature-store tests: the bundled demo faces and face backbone (no ../shared
needed), and a fake model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage
from PIL import Image

from ddpmseg.backbone import Backbone, ModelFlags
from ddpmseg.backbone.bundled import DEMO_DATA, resolve_checkpoint
from ddpmseg.config import Config

FACES64_STEPS = (10, 400)
FACES64_BLOCKS = (2, 5, 8, 11)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), with a store's writer token left out:
    each extract attempt draws a random one (store.WRITER), the rest must be equal bytes."""
    return {str(p.relative_to(root)): _without_token(root, p.relative_to(root), p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _without_token(root: Path, rel: Path, data: bytes) -> bytes:
    if rel.parts[0] == "writer" and rel.parts[1:2] == ("c",):
        per = shard_size(root, "writer")
        if not per:
            return data[8:16]  # [token, maps digest] uint64 + crc32c: the digest alone
        # A shard: each inner chunk's digest alone, in order (the index and crc32c cover
        # the tokens).
        spans = shard_index(data, per)
        return b"".join(data[a + 8:a + 16] for a, n in spans if n)
    if str(rel) == "zarr.json":
        meta = json.loads(data)
        attrs = meta.get("attributes", {})
        if attrs.pop("writer", None) is not None:
            attrs.pop("ddpmseg_digest", None)  # it covers the token
        return json.dumps(meta, sort_keys=True).encode()
    return data


def shard_size(store: Path, name: str) -> int:
    """Images per shard of an array of a store (0: unsharded: format 1 or 2, or format 3's
    flags and records)."""
    meta = json.loads((store / name / "zarr.json").read_text())
    if meta["codecs"][0]["name"] != "sharding_indexed":
        return 0
    return meta["chunk_grid"]["configuration"]["chunk_shape"][0]


def shard_index(raw: bytes, per: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each inner chunk of a shard file (zarr's sharding codec: the index
    at the end, one uint64 pair per inner chunk, then its crc32c; 2**64-1 for an absent one)."""
    index = np.frombuffer(raw[len(raw) - 4 - 16 * per:len(raw) - 4], dtype="<u8")
    return [(int(a), 0 if int(a) == 2 ** 64 - 1 else int(n)) for a, n in index.reshape(per, 2)]


def image_chunk(store: Path, name: str, i: int) -> tuple[Path, int, int]:
    """(file, start, end) of image i's chunk of an array: the chunk file (format 2), or its
    inner chunk's bytes within the shard file (format 3)."""
    store = Path(store)
    per = shard_size(store, name)
    meta = json.loads((store / name / "zarr.json").read_text())
    rest = ["0"] * (len(meta["shape"]) - 1)
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    if not per and rows > 1:  # format 3's flags and records: a chunk of several images
        f = store.joinpath(name, "c", str(i // rows), *rest)
        row = (f.stat().st_size - 4) // rows   # uncompressed, then a crc32c
        return f, (i % rows) * row, (i % rows + 1) * row
    if not per:
        f = store.joinpath(name, "c", str(i), *rest)
        return f, 0, f.stat().st_size
    f = store.joinpath(name, "c", str(i // per), *rest)
    a, n = shard_index(f.read_bytes(), per)[i % per]
    return f, a, a + n


def flip_byte(store: Path, name: str, i: int, at: float = 0.5, bit: int = 0x10) -> None:
    """Flip one bit of image i's chunk of an array (``at``: where in the chunk, 0..1)."""
    f, a, b = image_chunk(store, name, i)
    raw = bytearray(f.read_bytes())
    raw[a + int((b - a - 1) * at)] ^= bit
    f.write_bytes(bytes(raw))


def make_folder(dest: Path, images: list[np.ndarray], masks: list[np.ndarray | None],
                names: list[str] | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    names = names or [f"img{k:03d}" for k in range(len(images))]
    for name, im, mask in zip(names, images, masks):
        Image.fromarray(im).save(dest / f"{name}.png")
        if mask is not None:
            np.save(dest / f"{name}.npy", mask)
    return dest


def sigkill_when(proc, ready, timeout: float = 120) -> None:
    """SIGKILL the subprocess ``proc`` as soon as ``ready()`` is true (polled every 20 ms);
    fails if the process ends first or nothing is ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the process ended before the kill: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("the process made no progress")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="session")
def faces64_ckpt() -> Path:
    """The small face backbone that ships in the package."""
    return resolve_checkpoint("bundled:faces_64")


@pytest.fixture(scope="session")
def faces64(faces64_ckpt):
    return Backbone.from_checkpoint(faces64_ckpt, "faces_64", device="cpu")


@pytest.fixture(scope="session")
def faces() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Six real ffhq_34 training images and masks at 64x64: the bundled demo set."""
    out = []
    for p in sorted((DEMO_DATA / "train").glob("*.png"))[:6]:
        with Image.open(p) as im:
            image = np.asarray(im.convert("RGB")).copy()
        out.append((p.stem, image, np.load(p.with_suffix(".npy"))))
    assert len(out) == 6, "the bundled demo set has at least six training images"
    return out


@pytest.fixture
def faces_dir(tmp_path, faces) -> Path:
    """A data folder of the first four faces (png + npy)."""
    sel = faces[:4]
    return make_folder(tmp_path / "data", [f[1] for f in sel], [f[2] for f in sel],
                       [f[0] for f in sel])


@pytest.fixture
def faces_config(faces64_ckpt) -> Config:
    return Config().replace(
        data={"num_classes": 34, "ignore_label": 255},
        model={"preset": "faces_64", "checkpoint": str(faces64_ckpt)},
        features={"steps": FACES64_STEPS, "blocks": FACES64_BLOCKS})


class FakeBackbone:
    """Deterministic stand-in for ddpmseg.backbone.Backbone (no model): activations are
    smooth functions of the image, times ``scale``; for overflow and store-only tests."""

    def __init__(self, scale: float = 1.0, image_size: int = 32, tag: str = "fake"):
        base = ModelFlags.resolve("tiny64_cosine").to_dict()
        self.flags = ModelFlags.from_dict({**base, "image_size": image_size,
                                           "channel_mult": "1,2,2"})
        self.scale = scale
        self.sha256 = hashlib.sha256(tag.encode()).hexdigest()
        self.device = torch.device("cpu")
        self.calls = 0

    def fingerprint(self) -> dict:
        return {"sha256": self.sha256, "flags": self.flags.to_dict()}

    def block_shapes(self, blocks):
        s = self.flags.image_size
        return {b: (4 + b, s // 2 ** (b % 3), s // 2 ** (b % 3)) for b in blocks}

    def activations(self, x0, steps, blocks, noise=None, seed=0, *, precision="fp32", **kw):
        self.calls += 1
        shapes = self.block_shapes(blocks)
        out = {}
        for t in steps:
            for b in blocks:
                c, h, w = shapes[b]
                small = torch.nn.functional.adaptive_avg_pool2d(x0.float(), (h, w))
                chans = [small[:, k % 3] * (k + 1) + t / 1000 + b for k in range(c)]
                out[(t, b)] = torch.stack(chans, dim=1) * self.scale
        return out


@pytest.fixture
def fake_backbone():
    return FakeBackbone


@pytest.fixture
def synthetic_dir(tmp_path) -> Path:
    """Four random 32x32 images with 3-class masks (no ../shared needed)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    masks = []
    for _ in range(4):
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 8:24] = 1
        m[:4, :] = 2
        masks.append(m)
    return make_folder(tmp_path / "synthetic", images, masks)


@pytest.fixture
def fake_config() -> Config:
    return Config().replace(data={"num_classes": 3, "ignore_label": 255},
                                   features={"steps": (5, 50), "blocks": (1, 2)})


@pytest.fixture
def helpers():
    """The plain helper functions of this conftest (conftest modules are not importable)."""

    class H:
        pass

    H.tree_bytes = staticmethod(tree_bytes)
    H.image_chunk = staticmethod(image_chunk)
    H.flip_byte = staticmethod(flip_byte)
    H.make_folder = staticmethod(make_folder)
    H.FakeBackbone = FakeBackbone
    H.sigkill_when = staticmethod(sigkill_when)
    return H


@pytest.fixture
def count_writes(monkeypatch):
    """``with count_writes() as written:``: the bytes zarr's LocalStore writes inside the block,
    by key (a Counter)."""
    real = zarr.storage.LocalStore.set

    @contextlib.contextmanager
    def counting():
        written: Counter = Counter()

        async def counted(self, key, value):
            written[key] += len(value)
            return await real(self, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", counted)
        try:
            yield written
        finally:
            monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    return counting
