import json

import pytest

from ddpmseg.config import Config, load_config, bundled_configs
from ddpmseg.errors import ConfigError, InputNotFoundError


def test_bundled_configs_load_with_their_class_counts():
    expected = {"bedroom_28": (29, 0), "ffhq_34": (34, 255), "cat_15": (15, 255),
                "horse_21": (21, 255), "celeba_19": (19, 255), "ade_bedroom_30": (30, 255)}
    for name, (classes, ignore) in expected.items():
        cfg = load_config(name)
        assert (cfg.data.num_classes, cfg.data.ignore_label) == (classes, ignore)
        assert len(cfg.data.class_names) == classes
        assert cfg.features.steps == (50, 150, 250) and cfg.features.blocks == (5, 6, 7, 8, 12)
    assert set(expected) <= set(bundled_configs())


def test_overrides_replace_only_given_keys():
    cfg = load_config("ffhq_34").with_overrides(classifier={"ensemble": 3, "lr": None},
                                               features={"steps": (10,)})
    assert cfg.classifier.ensemble == 3 and cfg.classifier.lr == 1e-3
    assert cfg.features.steps == (10,) and cfg.features.blocks == (5, 6, 7, 8, 12)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[classifier]\nensembel = 3\n")
    with pytest.raises(ConfigError, match="ensembel"):
        load_config(path)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[features]\nsteps = "50,150"\n')
    with pytest.raises(ConfigError, match=r"\[features\].steps"):
        load_config(path)
    path.write_text('[classifier]\nensemble = true\n')
    with pytest.raises(ConfigError, match="ensemble"):
        load_config(path)


def test_unknown_section_and_missing_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nx = 1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(path)
    with pytest.raises(InputNotFoundError):
        load_config(tmp_path / "absent.toml")


def test_json_round_trip(tmp_path):
    cfg = load_config("bedroom_28")
    cfg.to_json(tmp_path / "c.json")
    assert Config.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg


def test_blocks_may_be_names(tmp_path):
    """features.blocks: indices, or (diffusers backbones) names such as "up2.res1"."""
    path = tmp_path / "c.toml"
    path.write_text('[features]\nblocks = [1, "up2.res1"]\n')
    assert load_config(path).features.blocks == (1, "up2.res1")
    with pytest.raises(ConfigError, match="must be int or str, got 1.5"):
        Config().with_overrides(features={"blocks": (1.5,)})
