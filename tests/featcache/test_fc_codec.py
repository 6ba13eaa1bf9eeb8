"""The lossy codec option (bitroundK): rounding, its error bound, metadata, round trip, CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddpmseg.spec import BackboneId
from ddpmseg.cli.main import cli as cli_main
from ddpmseg.core.errors import ConfigError, FeatureOverflowError
from ddpmseg.featcache import FeatureStore, StoreInfo
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import (
    DEFAULT_CODEC,
    MANTISSA_BITS,
    codec_name,
    parse_codec,
    round_mantissa,
)

from .test_fc_store import SHAPES, random_labels, random_maps

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_info(dtype, codec, n=2):
    spec = FeatureSpec(steps=(10, 20), blocks=(1, 2), shapes=SHAPES, image_size=(16, 16),
                       dtype=dtype, backbone=BackboneId("ab" * 32, {"image_size": 16}))
    return StoreInfo(spec, num_images=n, names=tuple(f"im{k}" for k in range(n)), num_classes=3,
                     ignore_label=255, codec=parse_codec(codec, dtype))


def test_parse_codec_names_and_errors():
    assert parse_codec(None) == DEFAULT_CODEC and parse_codec("lossless") == DEFAULT_CODEC
    assert parse_codec("bitround3") == {**DEFAULT_CODEC, "keepbits": 3}
    assert codec_name(parse_codec("bitround3")) == "bitround3"
    assert codec_name(DEFAULT_CODEC) == "lossless"
    assert parse_codec("bitround22", "float32")["keepbits"] == 22
    for bad, dtype in (("bitround0", "float16"), ("bitround10", "float16"),
                       ("bitround7", "bfloat16"), ("zstd9", "float16"), ("bitround", "float16")):
        with pytest.raises(ConfigError, match="bitroundK"):
            parse_codec(bad, dtype)


def test_round_mantissa_exact_values():
    x = torch.tensor([1.0, 1.0 + 2 ** -10, 1.5 + 2 ** -3, 1.75, 1.875, -1.875, 0.0, 65504.0],
                     dtype=torch.float16)
    # keep 1 bit: values are 1.0 or 1.5 times a power of two; ties go to the even mantissa.
    got = round_mantissa(x, 1).tolist()
    assert got == [1.0, 1.0, 1.5, 2.0, 2.0, -2.0, 0.0, float("inf")]
    assert round_mantissa(x, 10) is x   # nothing dropped


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("keep", [1, 3, 5])
def test_round_mantissa_error_bound_and_idempotence(dtype, keep):
    gen = torch.Generator().manual_seed(keep)
    x = (torch.randn(20000, generator=gen) * torch.exp(torch.randn(20000, generator=gen) * 2)
         ).to(TORCH[dtype])
    r = round_mantissa(x, keep)
    assert r.dtype == x.dtype and torch.isfinite(r).all()
    tiny = torch.finfo(TORCH[dtype]).tiny
    normal = x.float().abs() >= tiny
    rel = (r.double() - x.double()).abs()[normal] / x.double().abs()[normal]
    assert float(rel.max()) <= 2.0 ** -(keep + 1)
    assert float(rel.max()) > 2.0 ** -(keep + 3)   # it does round: the bound is nearly reached
    # what is kept has at most `keep` mantissa bits: rounding again changes nothing
    assert torch.equal(round_mantissa(r, keep), r)
    if keep + 1 < MANTISSA_BITS[dtype]:
        assert not torch.equal(round_mantissa(x, keep + 1), r)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lossy_store_round_trip_within_bound_and_in_metadata(tmp_path, dtype):
    store = FeatureStore.create(tmp_path / "s.zarr", make_info(dtype, "bitround3"))
    for i in range(2):
        store.write_image(i, random_maps(i), random_labels(i))
    back = FeatureStore.open(tmp_path / "s.zarr")
    assert back.info.codec["keepbits"] == 3
    meta = json.loads((tmp_path / "s.zarr" / "act_t10_b1" / "zarr.json").read_text())
    assert meta["attributes"]["keepbits"] == 3
    for i in range(2):
        for got, want in zip(back.maps(i), random_maps(i)):
            exact = want.to(TORCH[dtype]).double()   # the lossless store's values
            err = (torch.from_numpy(got.astype(np.float32)).double() - exact).abs()
            assert float((err / exact.abs().clamp_min(1e-30)).max()) <= 2.0 ** -4
            assert float(err.max()) > 0
        np.testing.assert_array_equal(back.labels(i), random_labels(i))
    # the same maps stored losslessly take more bytes
    lossless = FeatureStore.create(tmp_path / "l.zarr", make_info(dtype, "lossless"))
    for i in range(2):
        lossless.write_image(i, random_maps(i), random_labels(i))

    def act_bytes(root):
        return sum(f.stat().st_size for d in root.glob("act_*") for f in d.rglob("*")
                   if f.is_file())
    assert act_bytes(tmp_path / "s.zarr") < act_bytes(tmp_path / "l.zarr")


def test_rounding_up_past_float16_max_is_an_overflow_error(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_info("float16", "bitround2"))
    maps = random_maps(0)
    maps[0][0, 0, 0] = 65500.0   # finite in float16, rounds to 65536 = inf with 2 bits
    with pytest.raises(FeatureOverflowError, match="im0"):
        store.write_image(0, maps, random_labels(0))
    assert not FeatureStore.open(tmp_path / "s.zarr").complete()[0]


def test_extract_cli_codec_option(tmp_path, faces64_ckpt):
    from .conftest import make_folder

    rng = np.random.default_rng(0)
    data = make_folder(tmp_path / "data", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)],
                       [rng.integers(0, 2, (64, 64)).astype(np.uint8)])
    args = ["extract", str(data), str(tmp_path / "s.zarr"), "--preset", "faces_64",
            "--checkpoint", str(faces64_ckpt), "--steps", "10", "--blocks", "2", "--no-progress"]
    res = CliRunner().invoke(cli_main, args + ["--codec", "bitround4"])
    assert res.exit_code == 0, res.output
    assert "float16 bitround4" in res.output
    assert FeatureStore.open(tmp_path / "s.zarr").info.codec["keepbits"] == 4
    res = CliRunner().invoke(cli_main, args[:2] + [str(tmp_path / "t.zarr")] + args[3:]
                             + ["--codec", "bitround12"])
    assert res.exit_code == 2 and "bitroundK" in res.output
    assert not (tmp_path / "t.zarr").exists()


def test_rounding_is_part_of_the_feature_spec_and_old_infos_read_as_lossless():
    lossy, lossless = make_info("float16", "bitround3"), make_info("float16", "lossless")
    assert lossy.spec.keepbits == 3 and lossless.spec.keepbits is None
    assert StoreInfo.from_json(lossy.to_json()) == lossy
    assert lossy.to_json()["codec"] == {**DEFAULT_CODEC, "keepbits": 3}  # format unchanged
    # the spec's comparison says it, once, naming both roundings
    assert lossy.spec.differences(lossless.spec, "in the run", "in the store") == [
        "rounding (bitround3 in the run, lossless in the store)"]
    assert lossy.differences(lossless) == ["rounding (bitround3 here, lossless in the store)"]
    # a store or run written before the rounding was in the contract: lossless
    old = lossless.to_json()
    old["codec"] = {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
    assert StoreInfo.from_json(old).spec.keepbits is None
    assert FeatureSpec.from_json({k: v for k, v in lossless.spec.to_json().items()
                                  if k != "keepbits"}) == lossless.spec
