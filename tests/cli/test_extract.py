"""``ddpmseg extract`` through click's CliRunner, with the bundled face backbone and images."""


import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.backbone.bundled import DEMO_DATA
from ddpmseg.cli.main import cli
from ddpmseg.featcache import FeatureStore


@pytest.fixture
def data_dir(tmp_path):
    """Three real ffhq_34 images (the bundled demo set, 64x64) with grey PNG masks."""
    src = sorted((DEMO_DATA / "train").glob("*.png"))[:3]
    out = tmp_path / "data"
    out.mkdir()
    for p in src:
        (out / p.name).write_bytes(p.read_bytes())
        Image.fromarray(np.load(p.with_suffix(".npy"))).save(out / f"{p.stem}_mask.png")
    return out


@pytest.fixture
def config_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text("""
[data]
name = "faces"
num_classes = 34
ignore_label = 255

[model]
preset = "faces_64"
checkpoint = "bundled:faces_64"

[features]
steps = [10, 400]
blocks = [2, 5, 8, 11]
""")
    return path


def test_extract_command(tmp_path, data_dir, config_toml):
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, ["extract", str(data_dir), str(store_path), "--config",
                                      str(config_toml), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output and "640 dims" in result.output
    store = FeatureStore.open(store_path)
    assert store.complete().all() and store.info.has_labels
    assert store.info.steps == (10, 400) and store.info.dtype == "float16"
    assert store.config["data"]["name"] == "faces"
    assert store.config["model"]["preset"] == "faces_64"
    assert store.labels(0).shape == (64, 64)


def test_options_override_the_config(tmp_path, data_dir, config_toml):
    store_path = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, [
        "extract", str(data_dir), str(store_path), "--config", str(config_toml),
        "--steps", "10", "--blocks", "2,8", "--dtype", "bfloat16", "--seed", "3",
        "--images-per-batch", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    info = FeatureStore.open(store_path).info
    assert (info.steps, info.blocks, info.dtype, info.seed) == ((10,), (2, 8), "bfloat16", 3)
    assert FeatureStore.open(store_path).config["features"]["images_per_batch"] == 2
    # Rerun with other steps: refused, naming them, one line, no traceback.
    again = CliRunner().invoke(cli, ["extract", str(data_dir), str(store_path), "--config",
                                     str(config_toml), "--no-progress"])
    assert again.exit_code != 0
    assert "error:" in again.output and "steps" in again.output and "--overwrite" in again.output
    assert "Traceback" not in again.output


def test_wrong_path_is_a_one_line_error(tmp_path, config_toml):
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "nope"), str(tmp_path / "s.zarr"),
                                      "--config", str(config_toml), "--no-progress"])
    assert result.exit_code != 0
    assert "error:" in result.output and "nope" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_bad_options_are_usage_errors(tmp_path, data_dir, config_toml):
    result = CliRunner().invoke(cli, ["extract", str(data_dir), str(tmp_path / "s.zarr"),
                                      "--config", str(config_toml), "--steps", "10,x"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = CliRunner().invoke(cli, ["extract", str(data_dir), str(tmp_path / "s.zarr"),
                                      "--dtype", "int8"])
    assert result.exit_code == 2
    assert not (tmp_path / "s.zarr").exists()


def test_help_has_an_example():
    result = CliRunner().invoke(cli, ["extract", "--help"])
    assert result.exit_code == 0
    assert "ddpmseg extract data/" in result.output and "--scheduler" in result.output
