"""The UNet's structure: published keys and shapes, decoder geometry, early exit, attention."""

from __future__ import annotations

import json

import pytest
import torch

from ddpmseg.backbone import PRESETS, Backbone, ModelFlags, UNetModel
from ddpmseg.backbone.adm.unet import upsample_conv

SMALL = ModelFlags(image_size=32, num_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(16,), num_heads=2, learn_sigma=True)


def _meta_model(flags):
    with torch.device("meta"):
        return UNetModel.from_flags(flags)


def test_lsun_256_has_the_published_keys_and_shapes(adm_dir):
    manifest = json.loads((adm_dir / "adm_lsun256_state_dict_manifest.json").read_text())
    sd = _meta_model(PRESETS["lsun_256"]).state_dict()
    assert list(sd) == list(manifest["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["state_dict"]
    assert sum(v.numel() for v in sd.values()) == 552_814_086


def _shapes(flags):
    return [(c, flags.image_size // ds) for c, ds in _meta_model(flags).decoder_shapes]


def test_lsun_256_decoder_geometry_matches_the_design():
    # DESIGN.md section 2: block -> (channels, resolution).
    expected = ([(1024, 8)] * 2 + [(1024, 16)] * 3 + [(1024, 32)] + [(512, 32)] * 2
                + [(512, 64)] * 3 + [(512, 128)] + [(256, 128)] * 2 + [(256, 256)] * 4)
    assert _shapes(PRESETS["lsun_256"]) == expected


def test_faces_64_decoder_geometry_matches_its_readme():
    expected = ([(128, 8)] * 2 + [(128, 16)] + [(96, 16)] * 2 + [(96, 32)] + [(64, 32)] * 2
                + [(64, 64)] + [(32, 64)] * 3)
    assert _shapes(PRESETS["faces_64"]) == expected
    assert tuple(_meta_model(PRESETS["faces_64"]).out[2].weight.shape) == (3, 32, 3, 3)


def test_block_shapes_agree_with_real_activations():
    bb = Backbone.random(SMALL, seed=0)
    x = torch.zeros(1, 3, 32, 32)
    acts = bb.activations(x, [10], range(bb.num_blocks))
    assert {b: tuple(a.shape[1:]) for (_, b), a in acts.items()} == bb.block_shapes()


@pytest.mark.slow
def test_early_exit_is_bit_identical_and_skips_later_blocks():
    torch.manual_seed(0)
    model = UNetModel.from_flags(PRESETS["tiny64_cosine"]).eval()
    seen, calls = {}, []
    for i, block in enumerate(model.output_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.clone()))
        block.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    model.out.register_forward_hook(lambda m, a, out: calls.append("out"))
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([10, 400])
    with torch.inference_mode():
        full = model(x, t)
        assert full.shape == (2, 6, 64, 64)
        calls.clear()
        early = model.decoder_features(x, t, [2, 5])
    assert calls == [0, 1, 2, 3, 4, 5]  # nothing after block 5, and no `out`
    assert set(early) == {2, 5}
    for b in (2, 5):
        assert torch.equal(early[b], seen[b])


@pytest.mark.parametrize("preset", ["tiny64_cosine", "faces_64"])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.slow
def test_fast_inference_path_matches_the_direct_one(preset, precision):
    # Without autograd (no_grad or inference_mode) the blocks update their own temporaries in
    # place and fold the 3x3 conv after each nearest upsample into 2x2 convs at the low size;
    # with autograd (training) they run the original's way. Same values up to summation order:
    # held to 2e-6 of the largest activation in float32.
    flags = PRESETS[preset]
    torch.manual_seed(0)
    model = UNetModel.from_flags(flags).eval()
    size = flags.image_size
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([10, 400])
    blocks = range(len(model.output_blocks))
    autocast = torch.autocast("cpu", dtype=precision, enabled=precision is not None)
    model.requires_grad_(False)  # grad mode on (the direct path) but no graph recorded
    with torch.enable_grad(), autocast:
        want_out = model(x, t)
        want = model.decoder_features(x, t, blocks)
    model.requires_grad_(True)
    with torch.inference_mode(), autocast:
        got_out = model(x, t)
        got = model.decoder_features(x, t, blocks)
    rel = 2e-6 if precision is None else 2e-2
    pairs = [(got_out, want_out)] + [(got[b], want[b]) for b in want]
    for g, w in pairs:
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert float((g.float() - w.float()).abs().max()) <= rel * float(w.abs().max())
    # The fast path really is another path (or this test would prove nothing) ...
    assert any(not torch.equal(g, w) for g, w in pairs)
    # ... no_grad and inference_mode callers get the same numbers, bit for bit ...
    with torch.no_grad(), autocast:
        assert torch.equal(model(x, t), got_out)
        same = model.decoder_features(x, t, blocks)
    assert all(torch.equal(same[b], got[b]) for b in got)
    # ... and a training step still works (it is never taken with autograd).
    model.train()
    model(x, t).square().mean().backward()
    assert model.input_blocks[1][0].in_layers[2].weight.grad is not None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_is_conv_of_the_nearest_upsample(bias, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    x = torch.randn(2, 5, 3, 6).contiguous(memory_format=layout)  # odd and uneven sizes
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    with torch.inference_mode():
        got = upsample_conv(x, conv)
    assert got.shape == (2, 7, 6, 12) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # every tap matters: a kernel with one non-zero weight moves the output as it should
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 2] = 1.0  # top-right tap: out[y, x] = up[y - 1, x + 1]
    with torch.inference_mode():
        got = upsample_conv(x, conv)[0, 0] - (conv.bias[0] if bias else 0)
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")[0, 0]
    torch.testing.assert_close(got[1:, :-1], up[:-1, 1:], rtol=0, atol=1e-6)
    assert torch.all(got[0] == 0) and torch.all(got[:, -1] == 0)


def test_new_attention_order_is_a_permutation_of_the_legacy_one():
    flags = SMALL
    torch.manual_seed(0)
    legacy = UNetModel.from_flags(flags).eval()
    new = UNetModel.from_flags(ModelFlags.from_dict(
        {**flags.to_dict(), "use_new_attention_order": True})).eval()
    sd = legacy.state_dict()
    for name, module in legacy.named_modules():
        if hasattr(module, "qkv"):
            heads, ch = module.num_heads, module.channels // module.num_heads
            # legacy rows: head-major [q k v] per head; new rows: [all q][all k][all v].
            order = [h * 3 * ch + part * ch + c
                     for part in range(3) for h in range(heads) for c in range(ch)]
            for p in ("weight", "bias"):
                key = f"{name}.qkv.{p}"
                sd[key] = sd[key][order]
    new.load_state_dict(sd)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    with torch.inference_mode():
        torch.testing.assert_close(new(x, t), legacy(x, t), rtol=1e-5, atol=1e-5)


def test_class_conditional_model_needs_labels():
    flags = ModelFlags.from_dict({**SMALL.to_dict(), "class_cond": True})
    model = UNetModel.from_flags(flags).eval()
    assert tuple(model.label_emb.weight.shape) == (1000, 128)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.inference_mode():
        a = model(x, t, y=torch.tensor([0, 1]))
        b = model(x, t, y=torch.tensor([5, 1]))
        assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        with pytest.raises(ValueError):
            model(x, t)
