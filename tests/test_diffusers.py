"""diffusers backbones (UNet2DModel and Stable Diffusion) against diffusers itself, and end to end.

The models are tiny random-weight configs written by ``save_pretrained`` into a temporary folder
here: nothing is downloaded or committed.

- Parity: our activations equal the outputs of forward hooks on diffusers' own modules during
  diffusers' own full forward pass, fed by diffusers' scheduler (``add_noise``), VAE and text
  encoder, with the same noise: within 1e-5, for up_blocks and named sub-modules, in one batch
  or chunked; block_shapes equals what the forward produces.
- The store: features extracted into a float32 store give pixel features equal to the dense
  bilinear upsample (align_corners False, step-major then block) of those activations.
- Loading: strict (a weight file that does not fit config.json is an error), fingerprinted by
  the weight and config files, ``check-checkpoint`` on a folder.
- End to end on real ffhq_34 images at 64px: extract, fit, predict (from a store and from the
  image folder) and evaluate through the CLI with a UNet2DModel folder; predict refuses a store
  made by another backbone (the bundled ADM faces64 model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
transformers = pytest.importorskip("transformers", reason="the diffusers extra is not installed")

from ddpmseg.backbone import describe_backbone, load_backbone  # noqa: E402
from ddpmseg.backbone.hf.unet2d import DiffusersUNetBackbone  # noqa: E402
from ddpmseg.backbone.hf.sd import StableDiffusionBackbone  # noqa: E402
from ddpmseg.cli.main import cli  # noqa: E402
from ddpmseg.config import Config  # noqa: E402
from ddpmseg.core.errors import CheckpointError, ConfigError  # noqa: E402
from ddpmseg.pipelines.extract import extract  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = [10, 400]


def make_ddpm(root: Path, size: int = 32, seed: int = 0) -> Path:
    """A tiny UNet2DModel pipeline folder (unet/ + scheduler/) with random weights."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def make_sd(root: Path) -> Path:
    """A tiny Stable Diffusion folder: UNet2DConditionModel, AutoencoderKL (2x), CLIP text
    encoder and a CLIP tokenizer over a 54-token vocabulary, all random."""
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=8, attention_head_dim=8).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), latent_channels=4,
        norm_num_groups=8, sample_size=32, layers_per_block=1).save_pretrained(root / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(root / "text_encoder")
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"),
                               model_max_length=77).save_pretrained(tok)
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory) -> Path:
    return make_ddpm(tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return make_sd(tmp_path_factory.mktemp("sd"))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hooked(modules: dict, run) -> dict:
    """Outputs of ``modules`` (name -> module) while ``run()`` does a full forward."""
    got = {}
    handles = []
    for name, mod in modules.items():
        def fn(_m, _i, out, name=name):
            got[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return got


def reference_ddpm(folder: Path, x0, steps, blocks: dict, noise) -> dict:
    """What diffusers itself computes: {(t, name): (B, C, h, w)}, one full forward per step."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    modules = {name: get(unet) for name, get in blocks.items()}
    out = {}
    for t in steps:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        x_t = sched.add_noise(x0, noise.expand_as(x0), tt)
        got = hooked(modules, lambda: unet(x_t, tt))
        for name in blocks:
            out[(t, name)] = got[name]
    return out


DDPM_BLOCKS = {
    0: lambda u: u.up_blocks[0],
    1: lambda u: u.up_blocks[1],
    "up0.res1": lambda u: u.up_blocks[0].resnets[1],
    "up0.attn0": lambda u: u.up_blocks[0].attentions[0],
    "up0.upsample": lambda u: u.up_blocks[0].upsamplers[0],
}


def assert_close(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5, msg=str(key))


# -- UNet2DModel -------------------------------------------------------------------------------

def test_ddpm_activations_equal_diffusers_hooks(ddpm_dir):
    bb = load_backbone(ddpm_dir)
    assert isinstance(bb, DiffusersUNetBackbone)
    assert (bb.image_size, bb.num_steps) == (32, 1000)
    x0 = images(2, 32)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = reference_ddpm(ddpm_dir, x0, STEPS, DDPM_BLOCKS, noise)
    assert_close(bb.activations(x0, STEPS, list(DDPM_BLOCKS), noise=noise), ref)
    # Chunked forwards (3 of the 4 image-steps, then 1) give the same maps.
    assert_close(bb.activations(x0, STEPS, list(DDPM_BLOCKS), noise=noise, max_batch=3), ref)
    # The default noise is seeded CPU randn of the noised tensor's shape.
    assert_close(bb.activations(x0, STEPS, list(DDPM_BLOCKS), seed=5), ref)
    shapes = bb.block_shapes(list(DDPM_BLOCKS))
    assert {b: tuple(ref[(STEPS[0], b)].shape[1:]) for b in DDPM_BLOCKS} == shapes
    assert shapes[0] == (32, 32, 32) and shapes["up0.res1"] == (32, 16, 16)


def test_ddpm_stops_after_the_last_requested_block(ddpm_dir):
    bb = load_backbone(ddpm_dir)
    ran = []
    handle = bb.unet.conv_out.register_forward_hook(lambda *a: ran.append(1))
    try:
        bb.activations(images(1, 32), [10], [0])
        assert ran == []          # up_blocks[1] and the output conv never ran
        bb.activations(images(1, 32), [10], [1])
        assert ran == []          # conv_out comes after up_blocks[-1]: still never
    finally:
        handle.remove()


def test_ddpm_bad_blocks_and_steps(ddpm_dir):
    bb = load_backbone(ddpm_dir)
    x0 = images(1, 32)
    for blocks, match in (([2], "out of range"), (["up1.upsample"], "no upsampler"),
                          (["up0.res5"], "has 2 resnets"), (["down0"], "unknown block")):
        with pytest.raises(ConfigError, match=match):
            bb.activations(x0, [10], blocks)
    with pytest.raises(ConfigError, match="this model.s steps are 0..999"):
        bb.activations(x0, [1000], [0])


def test_ddpm_fingerprint_and_strict_loading(ddpm_dir, tmp_path):
    a, b = load_backbone(ddpm_dir), load_backbone(ddpm_dir)
    assert a.fingerprint() == b.fingerprint() == {"kind": "diffusers-unet", "sha256": a.sha256,
                                                  "flags": {}}
    other = make_ddpm(tmp_path / "other", seed=1)
    assert load_backbone(other).sha256 != a.sha256
    # A config.json that no longer fits the weights: an error naming the problem, not a
    # silently re-initialised layer.
    from safetensors.torch import load_file, save_file

    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["conv_out.bias"]
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match="does not match its config.json: missing keys: "
                                              "conv_out.bias"):
        load_backbone(other)
    assert CliRunner().invoke(cli, ["check-checkpoint", str(other)]).exit_code == 1
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 48]
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="size mismatch for"):
        load_backbone(other)


def test_check_checkpoint_on_a_folder(ddpm_dir):
    result = CliRunner().invoke(cli, ["check-checkpoint", str(ddpm_dir)])
    assert result.exit_code == 0, result.output
    sha = load_backbone(ddpm_dir).sha256
    assert f"sha256: {sha}" in result.output
    assert "loads strictly as a diffusers-unet folder" in result.output
    assert "image size: 32, steps: 1000" in result.output


def test_store_pixel_features_equal_dense_upsample(ddpm_dir, tmp_path):
    """Extract into a float32 store: its pixel features are the dense bilinear upsample."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    x = (images(2, 32, seed=3) + 1) * 127.5
    pix = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(2):
        Image.fromarray(pix[k]).save(data / f"im{k}.png")
        np.save(data / f"im{k}.npy", np.full((32, 32), k, np.uint8))
    blocks = [0, "up0.res1"]   # a named sub-module at 16px, upsampled to 32
    cfg = Config().replace(data={"num_classes": 2},
                                  features={"steps": STEPS, "blocks": blocks,
                                            "dtype": "float32", "seed": 7})
    store = extract(data, tmp_path / "s.zarr", cfg, checkpoint=str(ddpm_dir), device="cpu",
                    progress=False)
    assert store.info.fingerprint == json.loads(json.dumps(load_backbone(ddpm_dir).fingerprint()))
    x0 = torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 127.5 - 1
    acts = load_backbone(ddpm_dir).activations(x0, STEPS, blocks, seed=7)
    ys, xs = np.array([0, 5, 17, 31]), np.array([31, 2, 16, 0])
    for i in range(2):
        dense = torch.cat([F.interpolate(acts[(t, b)][i:i + 1], size=(32, 32), mode="bilinear",
                                         align_corners=False)[0]
                           for t in STEPS for b in blocks])
        got = store.pixel_features(i, ys, xs)
        want = dense[:, ys, xs].T
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=1e-5)


# -- Stable Diffusion --------------------------------------------------------------------------

def reference_sd(folder: Path, x0, steps, blocks, noise, prompt: str = "") -> dict:
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet",
                                                          local_files_only=True).eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
    enc = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                     local_files_only=True).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    with torch.no_grad():
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        emb = enc(ids)[0]
        lat = vae.encode(x0).latent_dist.mean * vae.config.scaling_factor
    modules = {b: unet.up_blocks[b] for b in blocks}
    out = {}
    for t in steps:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        z = sched.add_noise(lat, noise.expand_as(lat), tt)
        got = hooked(modules, lambda: unet(z, tt, encoder_hidden_states=emb.expand(
            x0.shape[0], -1, -1)))
        for b in blocks:
            out[(t, b)] = got[b]
    return out


def test_sd_activations_equal_diffusers_hooks(sd_dir):
    bb = load_backbone(sd_dir)
    assert isinstance(bb, StableDiffusionBackbone)
    assert (bb.image_size, bb.num_steps, bb.factor) == (32, 1000, 2)
    assert describe_backbone(str(sd_dir)).image_size == 32
    x0 = images(2, 32)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = reference_sd(sd_dir, x0, STEPS, [0, 1], noise)
    assert_close(bb.activations(x0, STEPS, [0, 1], noise=noise), ref)
    assert_close(bb.activations(x0, STEPS, [0, 1], seed=2, max_batch=1), ref)
    assert bb.block_shapes() == {0: (32, 16, 16), 1: (16, 16, 16)}
    assert bb.fingerprint() == {"kind": "stable-diffusion", "sha256": bb.sha256,
                                "flags": {"prompt": ""}}


def test_sd_prompt_conditions_the_features(sd_dir):
    bb = load_backbone(sd_dir, prompt="a cat")
    x0 = images(1, 32)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = reference_sd(sd_dir, x0, [10], [1], noise, prompt="a cat")
    assert_close(bb.activations(x0, [10], [1], noise=noise), ref)
    empty = load_backbone(sd_dir).activations(x0, [10], [1], noise=noise)
    assert (empty[(10, 1)] - ref[(10, 1)]).abs().max() > 1e-3
    # A store's fingerprint flags carry the prompt back into load_backbone (predict does so).
    assert load_backbone(sd_dir, {"prompt": "a cat"}).prompt == "a cat"
    assert bb.fingerprint()["flags"] == {"prompt": "a cat"}


def test_sd_missing_component(sd_dir, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer/"):
        load_backbone(broken)


# -- end to end on real images -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ffhq(shared_dir, missing_shared) -> Path:
    root = shared_dir / "data" / "ffhq_34" / "real"
    if not (root / "train").is_dir():
        missing_shared(f"{root} is absent: the real ffhq_34 data lives there")
    for split, n in (("train", 3), ("test", 2)):  # the most that copy_pairs is asked for
        if len(list((root / split).glob("*.png"))) < n:
            missing_shared(f"{root / split} holds fewer than {n} images")
    return root


def copy_pairs(src: Path, dst: Path, n: int) -> None:
    dst.mkdir(parents=True)
    for p in sorted(src.glob("*.png"))[:n]:
        shutil.copy(p, dst / p.name)
        shutil.copy(p.with_suffix(".npy"), dst / f"{p.stem}.npy")


@pytest.mark.slow
def test_end_to_end_ffhq34_with_a_unet2d_folder(ffhq, tmp_path):
    model = make_ddpm(tmp_path / "ddpm64", size=64)
    copy_pairs(ffhq / "train", tmp_path / "train", 3)
    copy_pairs(ffhq / "test", tmp_path / "test", 2)
    run = CliRunner().invoke
    common = ["--config", "ffhq_34", "--device", "cpu", "--no-progress"]
    feats = ["--checkpoint", str(model), "--steps", "50,150", "--blocks", "1,up0.res1",
             "--resize"]
    for split in ("train", "test"):
        r = run(cli, ["extract", str(tmp_path / split), str(tmp_path / f"{split}.zarr"),
                      *feats, *common])
        assert r.exit_code == 0, r.output
        assert "3 images" in r.output if split == "train" else "2 images" in r.output
        assert "96 dims per pixel" in r.output   # (16 + 32) channels x 2 steps
    r = run(cli, ["fit", str(tmp_path / "train.zarr"), str(tmp_path / "run"), "--ensemble", "2",
                  "--max-epochs", "1", *common])
    assert r.exit_code == 0, r.output
    r = run(cli, ["predict", str(tmp_path / "run"), str(tmp_path / "test.zarr"),
                  str(tmp_path / "pred"), "--at-model-size", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    # From the image folder, the model folder extracts anew: the same labels as from the store.
    r = run(cli, ["predict", str(tmp_path / "run"), str(tmp_path / "test"),
                  str(tmp_path / "pred_img"), "--checkpoint", str(model), "--resize",
                  "--at-model-size", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    names = sorted(p.stem for p in (tmp_path / "test").glob("*.png"))
    for name in names:
        a = np.load(tmp_path / "pred" / f"{name}.npy")
        b = np.load(tmp_path / "pred_img" / f"{name}.npy")
        assert a.shape == (64, 64) and (a == b).all()
    gt = tmp_path / "gt"
    gt.mkdir()
    from PIL import Image

    for name in names:   # ground truth at the predictions' size (nearest, as --resize does)
        m = np.load(tmp_path / "test" / f"{name}.npy")
        np.save(gt / f"{name}.npy",
                np.asarray(Image.fromarray(m).resize((64, 64), Image.NEAREST)))
    r = run(cli, ["evaluate", str(tmp_path / "pred"), str(gt), "--config", "ffhq_34"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1

    # A store made by another backbone (the bundled ADM faces64 model) is refused.
    r = run(cli, ["extract", str(tmp_path / "test"), str(tmp_path / "adm.zarr"),
                  "--preset", "faces_64", "--checkpoint", "bundled:faces_64", "--steps",
                  "50,150", "--blocks", "0,1", "--resize", *common])
    assert r.exit_code == 0, r.output
    r = run(cli, ["predict", str(tmp_path / "run"), str(tmp_path / "adm.zarr"),
                  str(tmp_path / "pred_adm"), "--device", "cpu", "--no-progress"])
    assert r.exit_code == 1
    assert "error: feature store" in r.output and "backbone kind (diffusers-unet in the run, adm in the store)" in r.output
    assert not (tmp_path / "pred_adm").exists()
    # ... and extracting with it into the diffusers store is refused, naming the fingerprint.
    r = run(cli, ["extract", str(tmp_path / "test"), str(tmp_path / "test.zarr"),
                  "--preset", "faces_64", "--checkpoint", "bundled:faces_64", "--steps",
                  "50,150", "--blocks", "0,1", "--resize", *common])
    assert r.exit_code == 1 and "checkpoint sha256" in r.output, r.output


def test_end_to_end_ffhq34_with_stable_diffusion(ffhq, sd_dir, ddpm_dir, tmp_path):
    """Library API: extract (32px, --resize), fit, predict from the store and from the images
    (the prompt comes back from the store's fingerprint), and a UNet2DModel store is refused."""
    from ddpmseg import fit, load_config, predict
    from ddpmseg.core.errors import StoreMismatchError

    copy_pairs(ffhq / "train", tmp_path / "train", 2)
    cfg = load_config("ffhq_34").replace(
        model={"checkpoint": str(sd_dir), "prompt": "a face"},
        features={"steps": [50, 150], "blocks": [0, 1]},
        classifier={"ensemble": 1, "max_epochs": 1})
    store = extract(tmp_path / "train", tmp_path / "sd.zarr", cfg, resize=True, progress=False)
    assert store.info.shapes == ((32, 16, 16), (16, 16, 16)) * 2
    assert store.info.fingerprint["flags"] == {"prompt": "a face"}
    run = fit(tmp_path / "sd.zarr", tmp_path / "run", cfg, device="cpu", progress=False)
    a = predict(run, tmp_path / "sd.zarr", tmp_path / "p1", device="cpu", progress=False)
    b = predict(run, tmp_path / "train", tmp_path / "p2", device="cpu", resize=True,
                progress=False)
    assert a["num_images"] == b["num_images"] == 2
    for name in a["names"]:
        assert (np.load(tmp_path / "p1" / f"{name}.npy") ==
                np.load(tmp_path / "p2" / f"{name}.npy")).all()
    other = cfg.replace(model={"checkpoint": str(ddpm_dir)})
    extract(tmp_path / "train", tmp_path / "ddpm.zarr", other, resize=True, progress=False)
    with pytest.raises(StoreMismatchError, match="backbone kind"):
        predict(run, tmp_path / "ddpm.zarr", tmp_path / "p3", device="cpu", progress=False)


@pytest.mark.distributed
def test_dask_workers_load_the_folder_and_match_one_process(ffhq, sd_dir, tmp_path):
    """With --scheduler the workers load the SD folder themselves (prompt included, from the
    fingerprint) and write the same maps as one process."""
    copy_pairs(ffhq / "train", tmp_path / "train", 2)
    cfg = Config().replace(data={"num_classes": 34},
                                  model={"checkpoint": str(sd_dir), "prompt": "a face"},
                                  features={"steps": [50], "blocks": [0, 1]})
    one = extract(tmp_path / "train", tmp_path / "one.zarr", cfg, resize=True, progress=False)
    dist = extract(tmp_path / "train", tmp_path / "dist.zarr", cfg, resize=True,
                   scheduler="local:1", progress=False)
    assert dist.info.fingerprint == one.info.fingerprint
    for i in range(2):
        for a, b in zip(one.maps(i), dist.maps(i)):
            np.testing.assert_array_equal(a, b)
