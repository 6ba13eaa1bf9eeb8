"""A store's pixel features equal the reference implementation's dense features (adm_tiny256).

The fixture's x0 and noise are not an 8-bit image and the seed-0 noise, so the store is filled
through the writer API (the same encode + write_image the extractor uses) from the backbone's
activations of that x0 and noise.
"""

import json

import numpy as np
import pytest
import torch

from ddpmseg.featcache import FeatureStore, StoreInfo
from ddpmseg.spec import FeatureSpec


@pytest.fixture(scope="module")
def tiny256(fixtures_dir):
    from ddpmseg.backbone import Backbone

    meta = json.loads((fixtures_dir / "adm_tiny256.json").read_text())
    ref = dict(np.load(fixtures_dir / "adm_tiny256_reference.npz"))
    bb = Backbone.from_checkpoint(fixtures_dir / "adm_tiny256.pt", meta["model_flags"])
    steps, blocks = tuple(meta["steps"]), tuple(meta["blocks"])
    acts = bb.activations(torch.from_numpy(ref["x0"]), steps, blocks,
                          noise=torch.from_numpy(ref["noise"]))
    return bb, steps, blocks, acts, ref


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_pixel_features_match_the_reference(tmp_path, tiny256, dtype):
    bb, steps, blocks, acts, ref = tiny256
    shapes = bb.block_shapes(blocks)
    spec = FeatureSpec(steps=steps, blocks=blocks,
                       shapes=tuple(shapes[b] for _ in steps for b in blocks),
                       image_size=(256, 256), backbone=bb.ident, dtype=dtype)
    info = StoreInfo(spec, num_images=1, names=("x0",), num_classes=2, ignore_label=255,
                     has_labels=False)
    store = FeatureStore.create(tmp_path / "s.zarr", info)
    store.write_image(0, [acts[k][0] for k in info.keys])

    reopened = FeatureStore.open(tmp_path / "s.zarr")
    got = reopened.pixel_features(0, ref["ys"], ref["xs"]).numpy()
    want = ref["pixel_features"]
    assert got.shape == want.shape == (64, 1056)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:
        # float16 keeps 11 significant bits: each stored tap is within 2^-11 of its magnitude,
        # and a bilinear weight set is convex, so a pixel feature is off by at most 2^-11 of
        # its map's largest magnitude (plus the float32 tolerance above).
        scale = np.concatenate([np.full(c, np.abs(ref[f"act_t{t}_b{b}"]).max())
                                for (t, b), (c, _, _) in zip(info.keys, info.shapes)])
        assert np.all(np.abs(got - want) <= scale * 2.0 ** -11 + 1e-4)
        assert np.abs(got - want).max() > 1e-4  # really rounded
        # And exactly what our float16-rounded activations give: the store adds no error.
        from ddpmseg.featcache import pixels

        rounded = [acts[k][0].half() for k in info.keys]
        exact = pixels.pixel_features(rounded, (256, 256), ref["ys"], ref["xs"]).numpy()
        np.testing.assert_array_equal(got, exact)
    # Native maps as the reference's activations.
    for (t, b), m in zip(info.keys, reopened.maps(0)):
        np.testing.assert_allclose(m.astype(np.float32), ref[f"act_t{t}_b{b}"][0],
                                   rtol=1e-3 if dtype == "float16" else 1e-4,
                                   atol=2e-3 if dtype == "float16" else 1e-4)
