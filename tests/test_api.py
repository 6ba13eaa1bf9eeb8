"""``import ddpmseg`` exposes the functions the CLI commands are thin over, with the CLI's rules;
a config is changed with ``Config.replace``."""

import dataclasses
import importlib

import numpy as np
import pytest
from click.testing import CliRunner

import ddpmseg
from ddpmseg.cli.main import cli
from ddpmseg.config import Config
from ddpmseg.core.errors import ConfigError
from ddpmseg.featcache.store import FeatureStore
from ddpmseg.pipelines.extract import resolve_model


def test_top_level_functions_are_the_library_functions():
    assert ddpmseg.extract is importlib.import_module("ddpmseg.pipelines.extract").extract
    assert ddpmseg.fit is importlib.import_module("ddpmseg.classifier").fit
    assert ddpmseg.load_config is importlib.import_module("ddpmseg.interop.reference_config").load_config
    assert ddpmseg.predict is importlib.import_module("ddpmseg.pipelines.predict").predict
    assert ddpmseg.evaluate is importlib.import_module("ddpmseg.outputs.evaluate").evaluate
    assert ddpmseg.demo is importlib.import_module("ddpmseg.pipelines.demo").demo
    assert ddpmseg.report is importlib.import_module("ddpmseg.outputs.report").report
    assert all(callable(getattr(ddpmseg, name)) for name in ddpmseg.__all__ if name != "__version__")


# -- one API: the Python call resolves the backbone as the CLI does -----------------------------


def test_library_extract_with_the_bundled_checkpoint_is_the_cli_extract(two_faces, tmp_path):
    """A default config and checkpoint="bundled:faces_64": the bundled preset with its usual
    steps and blocks, as `ddpmseg extract --checkpoint bundled:faces_64` (was a CheckpointError:
    the default preset lsun_256 and blocks 5,6,7,8,12)."""
    default = Config().replace(data={"num_classes": 34})  # the demo's ffhq_34 classes
    store = ddpmseg.extract(two_faces, tmp_path / "lib.zarr", default,
                            checkpoint="bundled:faces_64", resize=True, device="cpu",
                            progress=False)
    res = CliRunner().invoke(cli, ["extract", str(two_faces), str(tmp_path / "cli.zarr"),
                                   "--checkpoint", "bundled:faces_64", "--resize",
                                   "--num-classes", "34", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    other = FeatureStore.open(tmp_path / "cli.zarr")
    assert store.info.spec == other.info.spec
    assert store.info.blocks == (2, 4, 5, 7, 8) and store.info.steps == (50, 150, 250)
    assert store.config == other.config
    assert store.config["model"] == {"preset": "faces_64", "checkpoint": "bundled:faces_64",
                                     "prompt": ""}
    for i in range(len(store)):
        assert all(np.array_equal(a, b) for a, b in zip(store.maps(i), other.maps(i)))
        assert np.array_equal(store.labels(i), other.labels(i))


def test_resolve_model_keeps_what_the_config_sets():
    chosen = Config().replace(features={"blocks": (2, 4)})
    cfg = resolve_model(chosen, "bundled:faces_64")
    assert cfg.model.preset == "faces_64" and cfg.features.blocks == (2, 4)
    # A preset alone brings its bundled checkpoint and its usual blocks.
    cfg = resolve_model(Config().replace(model={"preset": "faces_64"}))
    assert cfg.model.checkpoint == "bundled:faces_64" and cfg.features.blocks == (2, 4, 5, 7, 8)
    # A 256 px checkpoint of the user's: nothing changes but the checkpoint.
    cfg = resolve_model(Config(), "my.pt")
    assert cfg == Config().replace(model={"checkpoint": "my.pt"})


# -- a config is changed with replace ------------------------------------------------------------

def test_config_replace_changes_a_key_and_checks_it():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.classifier.ensemble = 2
    changed = cfg.replace(classifier={"ensemble": 2}, predict={"vote": "hard"})
    assert changed.classifier.ensemble == 2 and changed.predict.vote == "hard"
    assert cfg.classifier.ensemble == 10  # the original is left as it was
    assert cfg.replace(classifier={"ensemble": 2}, predict={"vote": "hard"}) == changed
    with pytest.raises(ConfigError) as bad:
        cfg.replace(classifier={"ensemble": 0})
    assert str(bad.value).splitlines()[0].startswith("[classifier].ensemble must be >= 1, got 0")
    with pytest.raises(ConfigError, match="unknown key 'ensembl'"):
        cfg.replace(classifier={"ensembl": 2})
    with pytest.raises(ConfigError, match=r"\[classifier\] must be given as a dict"):
        cfg.replace(classifier=2)
