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


def test_is_store_is_the_one_test_of_a_store(tmp_path):
    from ddpmseg.featcache import store as store_module
    from ddpmseg.outputs import evaluate
    from ddpmseg.pipelines import predict

    path = tmp_path / "s.zarr"
    FeatureStore.create(path, make_info(1))
    (tmp_path / "images").mkdir()
    (tmp_path / "file").write_text("x")
    is_store = store_module.is_store
    assert is_store(path) and is_store(str(path))
    assert not any(is_store(p) for p in (tmp_path / "images", tmp_path / "file",
                                         tmp_path / "nothing"))
    # A URL can only be a store (image and mask folders are local): opening it says what is
    # there (issue 24: predict took s3://b/x.zarr for a local folder "s3:/b/x.zarr").
    assert is_store("memory://s.zarr") and is_store("s3://bucket/x.zarr")
    # predict and evaluate decide "a store, or a folder" with it, not with copies of their own
    assert predict.is_store is is_store and evaluate.is_store is is_store


def test_the_spec_of_a_backbone_and_what_each_check_tolerates():
    from ddpmseg.spec import TOLERATED

    class Model:   # any backbone: its shapes per block and its id
        def block_shapes(self, blocks):
            return {b: (b, 4 // b, 4 // b) for b in blocks}

        def fingerprint(self):
            return {"sha256": "ab" * 32, "flags": {"image_size": 16}}

    spec = FeatureSpec.of_backbone(Model(), [10, 20], ["1", 2], (16, 16), dtype="float32")
    assert spec.blocks == (1, 2) and spec.backbone == BackboneId("ab" * 32, {"image_size": 16})
    assert spec.shapes == ((1, 4, 4), (2, 2, 2), (1, 4, 4), (2, 2, 2))
    other = FeatureSpec.of_backbone(Model(), [10, 20], [1, 2], (16, 16), seed=3)
    assert spec.differences(other, ignore=TOLERATED["predict"]) == []
    assert [d.split(" ")[0] for d in spec.differences(other)] == ["seed", "dtype"]
