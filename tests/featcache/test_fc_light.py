"""Reading and checking a store imports no torch (``verify`` and ``evaluate`` against a store
pay nothing for it); only making tensors does."""

import subprocess
import sys
import textwrap

import numpy as np

from ddpmseg.featcache.store import FeatureStore, StoreInfo
from ddpmseg.spec import BackboneId, FeatureSpec

SHAPES = ((6, 4, 4), (3, 8, 8), (6, 4, 4), (3, 8, 8))


def make_info(n):
    spec = FeatureSpec(steps=(10, 20), blocks=(1, 2), shapes=SHAPES, image_size=(16, 16),
                       backbone=BackboneId("ab" * 32, {"image_size": 16}))
    return StoreInfo(spec, num_images=n, names=tuple(f"im{k}" for k in range(n)),
                     num_classes=3, ignore_label=255)

READ = """
import sys
import numpy as np
from ddpmseg.featcache import content, integrity
from ddpmseg.featcache.codec import parse_codec
from ddpmseg.featcache.store import FeatureStore, is_store
store = FeatureStore.open({path!r})
assert is_store({path!r}) and store.complete().all()
assert [m.dtype for m in store.maps(1)] == [np.float16] * 4
assert store.labels(1).shape == (16, 16) and store.damage(1) == []
assert content.active_mask(store).all() and parse_codec("bitround3")["keepbits"] == 3
print(sorted(m for m in ("torch", "ddpmseg.featcache.pixels") if m in sys.modules))
"""


def test_reading_a_store_imports_no_torch(tmp_path):
    path = str(tmp_path / "s.zarr")
    store = FeatureStore.create(path, make_info(2))
    rng = np.random.default_rng(0)
    for i in range(2):
        store.write_image(i, [rng.normal(size=s).astype(np.float32) for s in SHAPES],
                          rng.integers(0, 3, (16, 16)).astype(np.uint8))
    code = textwrap.dedent(READ.format(path=path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # Tensors are made where they are asked for.
    assert np.allclose(store.pixel_features(1, [0, 5], [3, 9]).shape, (2, 18))
