"""The whole CLI on real benchmark images (ffhq_34 from ../shared/data), and bad real inputs.

- End to end: 4 training and 2 test images of ffhq_34 with the bundled faces64 backbone
  (``--resize`` to 64x64), ``extract`` / ``fit`` / ``predict`` / ``evaluate`` through click's
  CliRunner. The mIoU in metrics.json is recomputed here, independently of ddpmseg, from the
  saved predictions and the ground truth downscaled with nearest (the reference definition:
  summed over the test set, per class other than the ignore label, empty union = 0, ignore
  pixels not masked), and must beat predicting the majority class everywhere.
- Bad input, each through ``ddpmseg extract`` on copies of real files: a mask of another size,
  a label beyond the class count, an image without its mask among labelled ones, a corrupt PNG
  (garbage bytes; a truncated file) are one ``error:`` line naming the file, exit code 1, no
  traceback, and nothing already written is lost; grey-scale and RGBA images are converted to
  RGB with a note (exit 0).

Skipped, saying why, when ../shared/data (or its ffhq_34 set) is absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import torch

from ddpmseg.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "faces64_ffhq_34"
NUM_CLASSES, IGNORE = 34, 255
SIZE = 64
COMMON = ["--config", CONFIG, "--device", "cpu", "--no-progress"]


# -- data ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ffhq(shared_dir, missing_shared) -> Path:
    root = shared_dir / "data" / "ffhq_34" / "real"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        missing_shared(f"{root}/train and test are absent: the real ffhq_34 benchmark data lives there")
    for split, n in (("train", 4), ("test", 2)):  # the most that copy_pairs is asked for
        if len(pairs(root / split)) < n:
            missing_shared(f"{root / split} holds fewer than {n} images with masks")
    return root


def pairs(src: Path) -> list[str]:
    return [p.stem for p in sorted(src.glob("*.png")) if p.with_suffix(".npy").is_file()]


def copy_pairs(src: Path, dst: Path, n: int) -> list[str]:
    """The first n <id>.png + <id>.npy pairs of src, copied into dst; returns the ids."""
    dst.mkdir(parents=True, exist_ok=True)
    names = pairs(src)[:n]
    assert len(names) == n, f"{src}: the ffhq fixture checked for {n} pairs"
    for name in names:
        shutil.copy2(src / f"{name}.png", dst / f"{name}.png")
        shutil.copy2(src / f"{name}.npy", dst / f"{name}.npy")
    return names


@contextlib.contextmanager
def quiet_module_setup():
    """For module-scoped fixtures (the function-scoped conftest ones do not cover them): one
    torch thread, and the root logger restored after the CLI pointed it at CliRunner's stream."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_ok(result, what: str):
    assert result.exit_code == 0, f"{what} failed ({result.exit_code}):\n{result.output}" + (
        "" if result.exception is None or isinstance(result.exception, SystemExit)
        else repr(result.exception))


def assert_clean_error(result, path: Path):
    """Exit 1, an `error:` line naming the file, no traceback, no unhandled exception."""
    out = result.output
    assert result.exit_code == 1, f"exit code {result.exit_code}:\n{out}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert str(path) in errors[0] or path.name in errors[0], errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under path (the store's exact bytes)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- end to end ---------------------------------------------------------------------------------

def reference_miou(preds: dict[str, np.ndarray], gts: dict[str, np.ndarray]) -> float:
    """The reference's mIoU, written out independently of ddpmseg.evaluate."""
    ious = []
    for c in range(NUM_CLASSES):
        if c == IGNORE:
            continue
        inter = union = 0
        for name, gt in gts.items():
            p, g = preds[name] == c, gt == c
            inter += int(np.logical_and(p, g).sum())
            union += int(np.logical_or(p, g).sum())
        ious.append(inter / union if union else 0.0)
    return float(np.mean(ious))


def downscale_mask(path: Path) -> np.ndarray:
    mask = np.load(path).astype(np.uint8)
    return np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.NEAREST), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipeline(ffhq, tmp_path_factory):
    """extract (train, test), fit, predict, evaluate through the CLI; every result kept."""
    root = tmp_path_factory.mktemp("real_e2e")
    train, test, gt = root / "train", root / "test", root / "gt64"
    copy_pairs(ffhq / "train", train, 4)
    test_names = copy_pairs(ffhq / "test", test, 2)
    # The ground truth at the predictions' size: the 256px masks downscaled with nearest, as
    # `extract --resize` brings training masks to the model's size.
    gt.mkdir()
    gts = {}
    for name in test_names:
        gts[name] = downscale_mask(test / f"{name}.npy")
        np.save(gt / f"{name}.npy", gts[name])
    r = {"root": root, "train": train, "test": test, "gt": gt, "gts": gts,
         "test_names": test_names}
    with quiet_module_setup():
        r["extract_train"] = invoke("extract", train, root / "train.zarr", *COMMON, "--resize")
        r["extract_test"] = invoke("extract", test, root / "test.zarr", *COMMON, "--resize")
        r["fit"] = invoke("fit", root / "train.zarr", root / "run", *COMMON, "--ensemble", "2",
                          "--max-epochs", "3")
        r["predict"] = invoke("predict", root / "run", root / "test.zarr", root / "preds",
                              "--images", test, "--at-model-size", "--device", "cpu",
                              "--no-progress")
        r["evaluate"] = invoke("evaluate", root / "preds", gt, "--config", CONFIG)
    return r


def test_every_command_exits_0(pipeline):
    for step in ("extract_train", "extract_test", "fit", "predict", "evaluate"):
        assert_ok(pipeline[step], step)


def test_outputs_exist(pipeline):
    root = pipeline["root"]
    assert (root / "train.zarr" / "zarr.json").is_file()
    assert (root / "test.zarr" / "zarr.json").is_file()
    assert sorted(p.name for p in (root / "run").glob("member_*.pt")) == \
        ["member_00.pt", "member_01.pt"]
    preds = root / "preds"
    for name in pipeline["test_names"]:
        for suffix in (".npy", ".png", "_overlay.png"):
            assert (preds / f"{name}{suffix}").is_file(), f"{name}{suffix} missing"
        labels = np.load(preds / f"{name}.npy")
        assert labels.shape == (SIZE, SIZE) and labels.dtype == np.uint8
    for once in ("predict.json", "summary.png", "palette.json", "metrics.json"):
        assert (preds / once).is_file(), once


def test_miou_matches_independent_recomputation(pipeline):
    preds_dir = pipeline["root"] / "preds"
    metrics = json.loads((preds_dir / "metrics.json").read_text())
    preds = {name: np.load(preds_dir / f"{name}.npy") for name in pipeline["test_names"]}
    ours = reference_miou(preds, pipeline["gts"])
    assert metrics["miou"] == pytest.approx(ours, abs=1e-12)
    assert metrics["num_images"] == 2 and metrics["evaluated_classes"] == NUM_CLASSES
    # The printed table says the same figure, in percent.
    assert f"mIoU {100 * ours:.2f}" in pipeline["evaluate"].output


def test_miou_beats_the_majority_class(pipeline):
    gts = pipeline["gts"]
    counts = np.bincount(np.concatenate([g.ravel() for g in gts.values()]), minlength=256)
    counts[IGNORE] = 0
    majority = int(counts.argmax())
    chance = reference_miou({n: np.full_like(g, majority) for n, g in gts.items()}, gts)
    miou = json.loads((pipeline["root"] / "preds" / "metrics.json").read_text())["miou"]
    assert miou > chance, (miou, chance)
    # Not a bare margin: several times the chance level (measured: 0.205 vs 0.016, ~12x).
    assert miou > 3 * chance, (miou, chance)


def test_evaluate_against_full_size_masks_is_a_clear_error(pipeline):
    """The 256px masks against 64px predictions: a size mismatch naming both files."""
    result = invoke("evaluate", pipeline["root"] / "preds", pipeline["test"], "--config", CONFIG)
    assert_clean_error(result, pipeline["test"] / f"{pipeline['test_names'][0]}.npy")
    assert "64x64" in result.output and "256x256" in result.output


# -- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def train_dir(ffhq, tmp_path) -> Path:
    d = tmp_path / "train"
    copy_pairs(ffhq / "train", d, 2)
    return d


@pytest.fixture(scope="module")
def good_store(ffhq, tmp_path_factory) -> Path:
    """A complete store of 2 real training images, to extract over after a failure."""
    root = tmp_path_factory.mktemp("good_store")
    copy_pairs(ffhq / "train", root / "train", 2)
    with quiet_module_setup():
        result = invoke("extract", root / "train", root / "store.zarr", *COMMON, "--resize")
    assert_ok(result, "extract of the good store")
    return root / "store.zarr"


def first(folder: Path, suffix: str) -> Path:
    return sorted(folder.glob(f"*{suffix}"))[0]


def break_mask_size(d: Path) -> Path:
    mask = first(d, ".npy")
    np.save(mask, np.load(mask)[:128, :200])
    return mask


def break_label(d: Path) -> Path:
    mask = first(d, ".npy")
    m = np.load(mask)
    m[:8, :8] = NUM_CLASSES + 6  # 40: beyond 0..33, not the ignore label
    np.save(mask, m)
    return mask


def drop_mask(d: Path) -> Path:
    mask = first(d, ".npy")
    mask.unlink()
    return mask.with_suffix(".png")  # the error names the image without a mask


def garbage_png(d: Path) -> Path:
    image = first(d, ".png")
    image.write_bytes(b"this is not a PNG file at all\x00\xff" * 10)
    return image


BROKEN = {"mask_size": break_mask_size, "label_beyond_classes": break_label,
          "image_without_mask": drop_mask, "garbage_png": garbage_png}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_input_is_a_clear_error_before_anything_is_written(case, train_dir, tmp_path):
    bad = BROKEN[case](train_dir)
    store = tmp_path / "new.zarr"
    result = invoke("extract", train_dir, store, *COMMON, "--resize")
    assert_clean_error(result, bad)
    # Inputs are checked before the store is created: nothing half-made is left behind.
    assert not store.exists()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_input_leaves_an_existing_store_intact(case, train_dir, good_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(good_store, store)
    before = tree_digest(store)
    bad = BROKEN[case](train_dir)
    result = invoke("extract", train_dir, store, *COMMON, "--resize")
    assert_clean_error(result, bad)
    assert tree_digest(store) == before
    # And the store still reads as complete.
    from ddpmseg.featcache import FeatureStore
    assert FeatureStore.open(store).complete().all()


def test_truncated_png_names_the_file_and_a_rerun_resumes(train_dir, tmp_path):
    """A PNG whose header is intact but whose data is cut: found when the pixels are decoded,
    so after the store is created. The error names the file; the images written before stay,
    the broken one is not flagged complete, and a rerun after fixing the file completes it."""
    from ddpmseg.featcache import FeatureStore

    images = sorted(train_dir.glob("*.png"))
    victim = images[-1]
    good_bytes = victim.read_bytes()
    victim.write_bytes(good_bytes[: len(good_bytes) // 3])
    store = tmp_path / "s.zarr"
    result = invoke("extract", train_dir, store, *COMMON, "--resize")
    assert_clean_error(result, victim)
    if store.exists():
        s = FeatureStore.open(store)
        flags = dict(zip(s.info.names, s.complete().tolist()))
        assert flags[victim.stem] is False, flags
    victim.write_bytes(good_bytes)
    assert_ok(invoke("extract", train_dir, store, *COMMON, "--resize"), "rerun after the fix")
    assert FeatureStore.open(store).complete().all()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_and_rgba_images_are_converted_with_a_note(mode, train_dir, tmp_path):
    image = first(train_dir, ".png")
    with Image.open(image) as im:
        im.convert(mode).save(image)
    store = tmp_path / "s.zarr"
    result = invoke("extract", train_dir, store, *COMMON, "--resize")
    assert_ok(result, f"extract with a {mode} image")
    notes = [line for line in result.output.splitlines()
             if "note" in line.lower() and image.name in line]
    assert notes and "RGB" in notes[0], result.output
    from ddpmseg.featcache import FeatureStore
    assert FeatureStore.open(store).complete().all()
