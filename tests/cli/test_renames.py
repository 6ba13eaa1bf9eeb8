"""One name per concept (issue 25): the renamed options, config keys and library keywords, and
their old spellings, which still work for one release with a note. Settings the CLI used to
set globally (torch's thread count, PIL's pixel limit) are passed to the library instead.

The library functions are replaced by recorders here: these tests check what the command line
turns into, fast, without a model."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import cli
from ddpmseg.config import Config, load_toml
from ddpmseg.core.renames import renamed_keyword

from tests.cli.test_fit import make_tiny_store

DEPRECATED = "is deprecated and will be removed in the next release"


class Called(Exception):
    """Raised by a recorder: the command got as far as calling the library."""


@pytest.fixture
def record(monkeypatch):
    """``record(module, name)``: replace a library function by one that keeps its arguments
    and stops the command; returns the dict the call lands in."""
    def install(module, name):
        seen = {}

        def recorder(*args, **kwargs):
            seen.clear()
            seen.update(kwargs, args=args)
            raise Called
        monkeypatch.setattr(module, name, recorder)
        return seen
    return install


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert isinstance(result.exception, Called), result.output
    return result


@pytest.mark.parametrize("spelling", ["--images-per-batch", "--batch-size"])
def test_extract_images_per_batch(tmp_path, record, spelling):
    seen = record(importlib.import_module("ddpmseg.pipelines.extract"), "extract")
    before = torch.get_num_threads(), Image.MAX_IMAGE_PIXELS
    res = invoke("extract", tmp_path, tmp_path / "s.zarr", spelling, 3, "--threads", 1,
                 "--max-image-pixels", 1234)
    assert seen["args"][2].features.images_per_batch == 3
    # Passed to the library, not set here for the rest of the process.
    assert (seen["threads"], seen["max_image_pixels"]) == (1, 1234)
    assert (torch.get_num_threads(), Image.MAX_IMAGE_PIXELS) == before
    noted = f"--batch-size {DEPRECATED}; use --images-per-batch" in res.stderr
    assert noted == (spelling == "--batch-size")


@pytest.mark.parametrize("spelling", ["--pixels-per-batch", "--batch-size"])
def test_fit_pixels_per_batch(tmp_path, record, spelling):
    import ddpmseg.classifier

    seen = record(ddpmseg.classifier, "fit")
    store = make_tiny_store(tmp_path / "s.zarr")
    res = invoke("fit", store, tmp_path / "run", spelling, 16, "--threads", 2)
    assert seen["args"][2].classifier.pixels_per_batch == 16 and seen["threads"] == 2
    noted = f"--batch-size {DEPRECATED}; use --pixels-per-batch" in res.stderr
    assert noted == (spelling == "--batch-size")


def test_train_backbone_iterations_and_passes(tmp_path, record):
    seen = record(importlib.import_module("ddpmseg.backbone.train"), "train_backbone")
    res = invoke("train-backbone", tmp_path, tmp_path / "out", "--preset", "faces_64",
                 "--iterations", 5, "--images-per-iteration", 4, "--sample-passes", 7)
    assert (seen["iterations"], seen["images_per_iteration"], seen["sample_passes"]) == (5, 4, 7)
    assert DEPRECATED not in res.stderr
    # Not given: the library's defaults, defined there only.
    invoke("train-backbone", tmp_path, tmp_path / "out", "--preset", "faces_64",
           "--minutes", 1)
    assert "images_per_iteration" not in seen and "sample_passes" not in seen
    res = invoke("train-backbone", tmp_path, tmp_path / "out", "--preset", "faces_64",
                 "--steps", 5, "--batch-size", 4, "--sample-steps", 7)
    assert (seen["iterations"], seen["images_per_iteration"], seen["sample_passes"]) == (5, 4, 7)
    for old, new in (("--steps", "--iterations"), ("--batch-size", "--images-per-iteration"),
                     ("--sample-steps", "--sample-passes")):
        assert f"{old} {DEPRECATED}; use {new}" in res.stderr


def test_threads_and_pixel_limit_reach_every_command(tmp_path, record):
    """Each command that takes --threads / --max-image-pixels passes them on."""
    cases = [("pipelines.predict", ["predict", "run", "in", "out"], True, True),
             ("pipelines.suggest", ["suggest", "run", "in"], True, True),
             ("pipelines.sweep", ["sweep", "a", "b"], True, False),
             ("outputs.evaluate", ["evaluate", "p", "g", "--num-classes", 2], False, True),
             ("outputs.report", ["report", "p"], False, True)]
    for module, args, threads, pixels in cases:
        name = module.split(".")[1]
        seen = record(importlib.import_module(f"ddpmseg.{module}"), name)
        invoke(*args, *(["--threads", 3] if threads else []),
               *(["--max-image-pixels", 99] if pixels else []))
        if threads:
            assert seen["threads"] == 3, name
        if pixels:
            assert seen["max_image_pixels"] == 99, name


def test_config_keys_renamed_old_ones_read_with_a_note(tmp_path, caplog):
    new = tmp_path / "new.toml"
    new.write_text("[features]\nimages_per_batch = 2\n[classifier]\npixels_per_batch = 32\n")
    old = tmp_path / "old.toml"
    old.write_text("[features]\nbatch_size = 2\n[classifier]\nbatch_size = 32\n")
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        assert load_toml(new) == load_toml(old)
    cfg = load_toml(new)
    assert (cfg.features.images_per_batch, cfg.classifier.pixels_per_batch) == (2, 32)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2
    assert "[features] batch_size is deprecated" in notes[0] and "images_per_batch" in notes[0]
    assert "[classifier] batch_size is deprecated" in notes[1] and "pixels_per_batch" in notes[1]
    # A run's or a store's recorded config (JSON) with the old keys: read silently, and what
    # is written now spells the new ones.
    caplog.clear()
    recorded = {"features": {"batch_size": 4}, "classifier": {"batch_size": 8}}
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        cfg = Config.from_dict(recorded, source="run")
    assert (cfg.features.images_per_batch, cfg.classifier.pixels_per_batch) == (4, 8)
    assert not caplog.records
    assert "batch_size" not in cfg.to_dict()["features"] | cfg.to_dict()["classifier"]


def test_library_keywords_renamed_old_ones_work_with_a_note(tmp_path, monkeypatch, caplog):
    from ddpmseg.backbone.train import loop

    seen = {}
    monkeypatch.setattr(loop, "_train",
                        lambda _images, _out, _flags, job, *a, **k: seen.update(vars(job)))
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        loop.train_backbone(tmp_path, tmp_path / "a", "faces_64", iterations=3,
                            images_per_iteration=2, sample_passes=5)
        assert not caplog.records
        first = dict(seen)
        loop.train_backbone(tmp_path, tmp_path / "b", "faces_64", steps=3, batch_size=2,
                            sample_steps=5)
    assert seen == first and (seen["steps"], seen["batch_size"], seen["sample_steps"]) == (3, 2, 5)
    notes = " ".join(r.getMessage() for r in caplog.records)
    for old, new in (("steps", "iterations"), ("batch_size", "images_per_iteration"),
                     ("sample_steps", "sample_passes")):
        assert f"train_backbone({old}=...) is deprecated" in notes and f"use {new}=" in notes
    assert renamed_keyword("f", "old", None, "new", 1) == 1


def test_extract_old_batch_size_keyword_is_images_per_batch(tmp_path, caplog):
    from ddpmseg.core.errors import ConfigError
    from ddpmseg.pipelines.extract import extract

    for kwargs in ({"images_per_batch": -1}, {"batch_size": -1}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpmseg"), \
                pytest.raises(ConfigError, match="images per batch must be at least 1, got -1"):
            extract(tmp_path, tmp_path / "s.zarr", Config(), progress=False, **kwargs)
        noted = "extract(batch_size=...) is deprecated" in caplog.text
        assert noted == ("batch_size" in kwargs)
    assert not (tmp_path / "s.zarr").exists()
