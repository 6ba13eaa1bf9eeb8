"""ModelFlags: guided-diffusion flag dicts in, validated flags and presets out."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ddpmseg.backbone import PRESETS, ModelFlags
from ddpmseg.core.errors import ConfigError, InputNotFoundError

FIXTURE_PRESETS = {"adm_tiny256.json": "tiny_256", "adm_tiny64_cosine.json": "tiny64_cosine"}


def _model_flags(path):
    return json.loads(path.read_text())["model_flags"]


@pytest.mark.parametrize("name", sorted(FIXTURE_PRESETS))
def test_fixture_flags_equal_their_preset(adm_dir, name):
    assert ModelFlags.from_dict(_model_flags(adm_dir / name)) == PRESETS[FIXTURE_PRESETS[name]]


def test_published_and_faces_flags_equal_their_presets(adm_dir, shared_dir):
    lsun = _model_flags(adm_dir / "adm_lsun256_state_dict_manifest.json")
    assert ModelFlags.from_dict(lsun) == PRESETS["lsun_256"]
    faces = _model_flags(shared_dir / "backbones" / "adm_faces64" / "adm_faces64.json")
    assert ModelFlags.from_dict(faces) == PRESETS["faces_64"]


def test_lsun_preset_values():
    f = PRESETS["lsun_256"]
    assert f.mult == (1, 1, 2, 2, 4, 4)
    assert f.attention_resolutions == (32, 16, 8)
    assert f.attention_ds == (8, 16, 32)
    assert f.out_channels == 6 and f.num_head_channels == 64 and f.num_classes is None
    assert PRESETS["faces_64"].mult == (1, 2, 3, 4) and PRESETS["faces_64"].out_channels == 3


def test_strings_and_lists_parse_alike():
    a = ModelFlags.from_dict({"image_size": 64, "channel_mult": "1,2,2",
                              "attention_resolutions": "16"})
    b = ModelFlags.from_dict({"image_size": 64, "channel_mult": [1, 2, 2],
                              "attention_resolutions": [16]})
    assert a == b
    assert a.channel_mult == (1, 2, 2) and a.attention_resolutions == (16,)
    assert ModelFlags(image_size=512).mult[0] == 0.5  # guided-diffusion's 512px default


def test_to_dict_round_trips_through_json():
    for flags in PRESETS.values():
        d = json.loads(json.dumps(flags.to_dict()))
        assert ModelFlags.from_dict(d) == flags
    assert PRESETS["lsun_256"].to_dict()["attention_resolutions"] == "32,16,8"


def test_training_only_flags_are_accepted_and_ignored():
    flags = ModelFlags.from_dict({"image_size": 64, "use_kl": True, "predict_xstart": True,
                                  "rescale_learned_sigmas": True, "use_checkpoint": True,
                                  "timestep_respacing": ""})
    assert flags == ModelFlags(image_size=64)


def test_unknown_flag_is_named():
    with pytest.raises(ConfigError, match="num_chanels"):
        ModelFlags.from_dict({"image_size": 64, "num_chanels": 128})


def test_timestep_respacing_is_rejected_clearly():
    with pytest.raises(ConfigError, match="timestep_respacing"):
        ModelFlags.from_dict({"timestep_respacing": "ddim25"})


def test_rescale_timesteps_is_kept():
    assert ModelFlags.from_dict({"rescale_timesteps": True}).rescale_timesteps is True


@pytest.mark.parametrize("bad", [
    {"num_channels": "wide"}, {"use_scale_shift_norm": "maybe"}, {"num_res_blocks": True},
    {"channel_mult": "1,x"}, {"attention_resolutions": "16.5"}, {"noise_schedule": "sigmoid"},
    {"image_size": 48}, {"num_channels": 40}, {"dropout": "high"}, {"diffusion_steps": 0},
])
def test_bad_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        ModelFlags.from_dict(bad)


def test_flags_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["lsun_256"].num_channels = 8


def test_resolve_accepts_every_form(adm_dir, tmp_path):
    tiny = PRESETS["tiny_256"]
    assert ModelFlags.resolve("tiny_256") is tiny
    assert ModelFlags.resolve(tiny) is tiny
    assert ModelFlags.resolve(_model_flags(adm_dir / "adm_tiny256.json")) == tiny
    assert ModelFlags.resolve(json.loads((adm_dir / "adm_tiny256.json").read_text())) == tiny
    assert ModelFlags.resolve(adm_dir / "adm_tiny256.json") == tiny  # {"model_flags": ...}
    bare = tmp_path / "flags.json"
    bare.write_text(json.dumps(tiny.to_dict()))
    assert ModelFlags.resolve(str(bare)) == tiny


def test_resolve_errors(tmp_path):
    with pytest.raises(ConfigError, match="lsun_256"):
        ModelFlags.resolve("lsun_bedroom_typo")
    with pytest.raises(InputNotFoundError):
        ModelFlags.resolve(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        ModelFlags.resolve(bad)
    with pytest.raises(ConfigError):
        ModelFlags.resolve(42)
