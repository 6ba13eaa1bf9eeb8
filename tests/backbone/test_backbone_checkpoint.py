"""Checkpoint loading: wrappers, prefixes, fp16, strictness and its error messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ddpmseg.backbone import Backbone, ModelFlags, load_state_dict
from ddpmseg.core.fileio import sha256_file
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.core.errors import CheckpointError, InputNotFoundError

FACES_SHA = "72d3f7bf7a9827b0525409e074d2259d8dce17db61f8c68ab62e5e02ad50d4f8"


@pytest.fixture(scope="module")
def faces64():
    """The bundled face backbone's state dict (a plain fp16 state dict)."""
    return torch.load(resolve_checkpoint("bundled:faces_64"), map_location="cpu",
                      weights_only=True)


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["state_dict", "model", "ema", None])
def test_wrapped_prefixed_fp16_copy_loads(tmp_path, faces64, wrap):
    half = {f"module.{k}": v.half() for k, v in faces64.items()}
    obj = {wrap: half, "step": torch.tensor(7)} if wrap else half
    path = _save(obj, tmp_path / "copy.pt")
    bb = Backbone.from_checkpoint(path, "faces_64")
    loaded = bb.model.state_dict()
    assert list(loaded) == list(faces64)
    for k, v in faces64.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.half().float())
    assert bb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_copy_loads_exactly(faces64):
    sd = load_state_dict(resolve_checkpoint("bundled:faces_64"))
    assert list(sd) == list(faces64) and all(torch.equal(sd[k], faces64[k]) for k in sd)


def test_wrong_preset_names_the_preset_that_fits(adm_dir):
    with pytest.raises(CheckpointError) as info:
        Backbone.from_checkpoint(adm_dir / "adm_tiny64_cosine.pt", "tiny_256")
    assert info.value.message.endswith("does not fit preset tiny_256 (256 missing keys, "
                                       "28 unexpected keys, 186 shape mismatches)")
    assert info.value.hint == "it loads as preset tiny64_cosine: pass `preset=tiny64_cosine`"
    assert len(str(info.value)) < 300


def test_wrong_flags_name_keys_and_flags(adm_dir):
    with pytest.raises(CheckpointError) as info:
        # The tiny_256 preset's flags as a dict: hand-written flags get the full diagnosis.
        Backbone.from_checkpoint(adm_dir / "adm_tiny64_cosine.pt",
                                 ModelFlags.resolve("tiny_256").to_dict())
    msg = str(info.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg
    assert "input_blocks.3.0.op.weight" in msg          # an unexpected key, by name
    assert "input_blocks.3.0.in_layers.0.weight" in msg  # a missing key, by name
    assert "image_size" in msg and "use_scale_shift_norm" in msg


def _tiny64_with(**changes):
    return ModelFlags.from_dict({**ModelFlags.resolve("tiny64_cosine").to_dict(), **changes})


@pytest.mark.parametrize("changes, flag, key", [
    ({"learn_sigma": False}, "learn_sigma", "out.2.weight"),
    ({"num_channels": 64}, "num_channels", "time_embed.0.weight"),
    ({"use_scale_shift_norm": True}, "use_scale_shift_norm", "emb_layers"),
    ({"attention_resolutions": "8"}, "attention_resolutions", "qkv"),
    ({"resblock_updown": True}, "resblock_updown", "input_blocks.3.0.op.weight"),
    ({"class_cond": True}, "class_cond", "label_emb.weight"),
])
def test_single_wrong_flag_is_suspected(adm_dir, changes, flag, key):
    with pytest.raises(CheckpointError) as info:
        Backbone.from_checkpoint(adm_dir / "adm_tiny64_cosine.pt", _tiny64_with(**changes))
    assert info.value.hint.startswith(f"check the model flags, most likely {flag} (")
    # Only the one wrong flag is suspected.
    others = {"learn_sigma", "num_channels", "use_scale_shift_norm", "attention_resolutions",
              "resblock_updown", "class_cond", "image_size"} - {flag}
    assert not [o for o in others if o in info.value.hint]
    assert key in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(InputNotFoundError):
        Backbone.from_checkpoint(tmp_path / "nope.pt", "tiny64_cosine")
    with pytest.raises(InputNotFoundError):
        load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(InputNotFoundError):
        sha256_file(tmp_path / "nope.pt")


class _NotWeights:
    pass


def test_unusable_files_are_checkpoint_errors(tmp_path):
    for name, obj in [("list.pt", [1, 2, 3]), ("meta.pt", {"epoch": 3, "lr": 0.1}),
                      ("code.pt", {"x": _NotWeights()})]:
        with pytest.raises(CheckpointError):
            load_state_dict(_save(obj, tmp_path / name))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_state_dict(junk)


def test_sha256_file_streams_the_whole_file(tmp_path):
    data = bytes(range(256)) * 9000  # several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_faces64_loads_strictly_with_its_preset(shared_dir, missing_shared):
    folder = shared_dir / "backbones" / "adm_faces64"
    path = folder / "adm_faces64.pt"
    if not path.is_file():
        missing_shared(f"{path} not present")
    bb = Backbone.from_checkpoint(path, "faces_64")
    sd = bb.model.state_dict()
    assert len(sd) == 386 and sum(v.numel() for v in sd.values()) == 6_295_043
    assert bb.sha256 == FACES_SHA
    meta = json.loads((folder / "adm_faces64.json").read_text())
    assert Backbone.from_checkpoint(path, folder / "adm_faces64.json").flags == bb.flags
    acts = bb.activations(torch.zeros(1, 3, 64, 64), meta["steps"], meta["blocks"])
    assert sum(a.shape[1] for a in acts.values()) == meta["feature_dim"]
    assert all(torch.isfinite(a).all() for a in acts.values())
