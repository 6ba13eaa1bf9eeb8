import json

import pytest

from ddpmseg.config import Config, bundled_configs, check_classes

from ddpmseg import load_config
from ddpmseg.core.errors import ConfigError, InputNotFoundError


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
    cfg = load_config("ffhq_34").replace(classifier={"ensemble": 3, "lr": None},
                                               features={"steps": (10,)})
    assert cfg.classifier.ensemble == 3 and cfg.classifier.lr == 1e-3
    assert cfg.features.steps == (10,) and cfg.features.blocks == (5, 6, 7, 8, 12)


@pytest.mark.parametrize("text, named", [
    ("[classifier]\nensembel = 3\n", "ensembel"),                 # an unknown key
    ('[features]\nsteps = "50,150"\n', r"\[features\].steps"),   # a value of the wrong type
    ("[classifier]\nensemble = true\n", "ensemble"),
    ("[trainer]\nx = 1\n", "trainer"),                            # an unknown section
])
def test_a_bad_config_names_what_is_wrong(tmp_path, text, named):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(path)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(InputNotFoundError, match="absent.toml"):
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
        Config().replace(features={"blocks": (1.5,)})


# -- numeric values are checked where a config is loaded -----------------------------------------
@pytest.mark.parametrize("section, line, key", [
    ("classifier", "etf_weight = inf", "etf_weight"),
    ("classifier", "etf_weight = nan", "etf_weight"),
    ("classifier", "etf_weight = -0.5", "etf_weight"),
    ("classifier", "lr = inf", "lr"),
    ("classifier", "lr = 0", "lr"),
    ("classifier", "ram_budget_gb = -inf", "ram_budget_gb"),
    ("classifier", "ensemble = 0", "ensemble"),
    ("classifier", "pixels_per_batch = 1", "pixels_per_batch"),
    ("classifier", "max_epochs = 0", "max_epochs"),
    ("classifier", "min_epochs = -1", "min_epochs"),
    ("classifier", "patience = -1", "patience"),
    ("classifier", 'etf = "both"', "etf"),
    ("data", "num_classes = 0", "num_classes"),
    ("data", "num_classes = 257", "num_classes"),
    ("data", "ignore_label = 256", "ignore_label"),
    ("data", "min_class_pixels = -1", "min_class_pixels"),
    ("features", "steps = [50, -1]", "steps"),
    ("features", "images_per_batch = 0", "images_per_batch"),
    ("predict", "tile_rows = 0", "tile_rows"),
    ("predict", 'vote = "loud"', "vote"),
])
def test_a_value_out_of_range_is_one_line_naming_key_and_file(tmp_path, section, line, key):
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and f"[{section}].{key}" in message, message


def test_an_override_out_of_range_is_refused_too():
    with pytest.raises(ConfigError, match=r"\[classifier\]\.etf_weight must be finite"):
        Config().replace(classifier={"etf_weight": float("inf")})
    with pytest.raises(ConfigError, match=r"\[classifier\]\.lr must be > 0"):
        Config().replace(classifier={"lr": 0.0})


def test_values_in_range_load(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("[classifier]\netf_weight = 0\nmin_epochs = 0\npatience = 0\n"
                    "[data]\nnum_classes = 256\nignore_label = 0\n")
    cfg = load_config(path)
    assert cfg.classifier.etf_weight == 0.0 and cfg.data.num_classes == 256


# -- a config's classes against the classes of a store or a prediction ----------------------------
def test_check_classes_names_both_sides():
    cat = load_config("cat_15")
    with pytest.raises(ConfigError) as info:
        check_classes(cat.data, "config cat_15", 11, 255, (), "preds/predict.json")
    message = str(info.value)
    assert "config cat_15" in message and "15 classes" in message
    assert "preds/predict.json" in message and "11 classes" in message
    with pytest.raises(ConfigError, match="ignore label 0.*ignore label 255"):
        check_classes(cat.data.__class__(num_classes=15, ignore_label=0), "config x", 15, 255,
                      (), "the store")
    names = list(cat.data.class_names)
    names[3] = "dog"
    with pytest.raises(ConfigError, match="class 3 is 'chest' in config cat_15, 'dog' in the store"):
        check_classes(cat.data, "config cat_15", 15, 255, tuple(names), "the store")
    # Agreeing classes pass, and names that one side does not give are not compared.
    check_classes(cat.data, "config cat_15", 15, 255, cat.data.class_names, "the store")
    check_classes(cat.data, "config cat_15", 15, 255, (), "the store")
