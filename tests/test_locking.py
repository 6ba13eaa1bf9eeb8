"""Readers and writers of a prediction folder take its lock: evaluate and report fail at once
while another process writes the folder they would read or write (suggest: in
tests/classifier/test_labelloop.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg.core import locking
from ddpmseg.cli.main import cli
from ddpmseg.outputs.evaluate import evaluate
from ddpmseg.core.locking import LockedError, writer_lock


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    labels = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    np.save(pred / "a.npy", labels)
    np.save(gt / "a.npy", labels)
    (pred / "predict.json").write_text('{"names": ["a"], "num_classes": 3}')
    return pred, gt


def test_evaluate_and_report_wait_for_no_predict(folders, hold_lock):
    pred, gt = folders
    pid = hold_lock(pred)
    for args in (["evaluate", str(pred), str(gt), "--num-classes", "3"], ["report", str(pred)]):
        result = CliRunner().invoke(cli, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: prediction folder {pred} is being written by "
                                   f"process {pid} ")
    with pytest.raises(LockedError):
        evaluate(pred, gt, num_classes=3, write=False)
    assert sorted(p.name for p in pred.iterdir()) == ["a.npy", "predict.json"]  # nothing new
    hold_lock.release()
    result = evaluate(pred, gt, num_classes=3)
    assert result["miou"] == pytest.approx(1.0) and (pred / "metrics.json").is_file()


def test_evaluate_locks_its_out_folder_too(folders, tmp_path, hold_lock):
    pred, gt = folders
    out = tmp_path / "metrics"
    hold_lock(out, "metrics folder")
    with pytest.raises(LockedError, match="metrics folder"):
        evaluate(pred, gt, num_classes=3, out=out)
    # reading alone does not need the out folder
    assert evaluate(pred, gt, num_classes=3, out=out, write=False)["miou"] == 1.0
    assert not out.exists() or not any(out.iterdir())


def test_a_reader_goes_on_unlocked_where_no_lock_can_be_made(folders, monkeypatch):
    pred, gt = folders
    monkeypatch.setattr(locking, "lock_path", lambda target: Path("/proc/no-such/x.lock"))
    assert evaluate(pred, gt, num_classes=3, write=False)["miou"] == 1.0
    with pytest.raises(locking.OutputError, match="cannot create /proc/no-such/x.lock"):
        with writer_lock(pred, "prediction folder"):
            pass


@pytest.mark.parametrize("held_by", ["real", "alias"])
def test_a_symlink_alias_takes_the_same_lock(tmp_path, hold_lock, held_by):
    """Locks are keyed by the resolved real path: a writer through a symlink to a folder
    another process writes (or the other way round) is refused, naming that process."""
    real = tmp_path / "runs" / "r1"
    real.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    alias = tmp_path / "elsewhere" / "alias"
    alias.symlink_to(real, target_is_directory=True)
    held, second = (real, alias) if held_by == "real" else (alias, real)
    pid = hold_lock(held, "run dir")
    with pytest.raises(LockedError, match=f"being written by process {pid} "):
        with writer_lock(second, "run dir"):
            pass
    assert locking.lock_path(alias) == locking.lock_path(real) == tmp_path / "runs" / ".r1.lock"


def test_two_fits_through_a_symlink_alias_the_second_is_refused(tmp_path, hold_lock):
    """The CLI's own case: `fit` into an alias of a run dir that another fit writes."""
    real = tmp_path / "run"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    pid = hold_lock(real, "run dir")
    from ddpmseg.classifier.train import fit
    with pytest.raises(LockedError, match=f"run dir {alias} is being written by process {pid}"):
        fit(_tiny_store(tmp_path), alias, device="cpu", progress=False)
    assert list(real.iterdir()) == []


def _tiny_store(tmp_path):
    import torch

    from ddpmseg.spec import FeatureSpec
    from ddpmseg.featcache.store import FeatureStore, StoreInfo
    spec = FeatureSpec(steps=(10,), blocks=(1,), shapes=((4, 4, 4),), image_size=(4, 4),
                       dtype="float32", backbone={"sha256": "s", "flags": {}})
    info = StoreInfo(spec, num_images=1, names=("a",), num_classes=2, ignore_label=255,
                     has_labels=True)
    store = FeatureStore.create(tmp_path / "s.zarr", info)
    store.write_image(0, [torch.ones(4, 4, 4)], np.array([[0, 1] * 2] * 4, dtype=np.uint8))
    return tmp_path / "s.zarr"


@pytest.mark.slow
def test_extract_through_a_symlink_writes_into_the_folder_it_points_to(tmp_path):
    """A store path that is a symlink to an empty folder, then --overwrite and --compact
    through it: the store is made and swapped in the folder the link points to, and the link
    stays a link (replacing the store used to rename the link itself aside and put a real
    folder in its place)."""
    from ddpmseg.backbone.bundled import DEMO_DATA
    from ddpmseg.featcache import FeatureStore

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted((DEMO_DATA / "train").glob("*.png"))[:2]:
        for f in (png, png.with_suffix(".npy")):
            (data / f.name).write_bytes(f.read_bytes())
    real = tmp_path / "stores" / "s.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "link.zarr"
    link.symlink_to(real, target_is_directory=True)
    args = ["extract", str(data), str(link), "--config", "faces64_ffhq_34", "--steps", "50",
            "--blocks", "4", "--threads", "1", "--device", "cpu", "--no-progress"]
    for extra in ([], ["--seed", "1", "--overwrite"]):
        result = CliRunner().invoke(cli, args + extra)
        assert result.exit_code == 0, result.output
        assert link.is_symlink() and (real / "zarr.json").is_file()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".link")] == []
    assert FeatureStore.open(real).info.spec.seed == 1
    # --compact swaps a copy in by renames: of the folder, never of the link
    first = sorted(data.glob("*.png"))[0]
    first.unlink()
    first.with_suffix(".npy").unlink()
    result = CliRunner().invoke(cli, args + ["--seed", "1", "--compact"])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and len(FeatureStore.open(real)) == 1
    # Beside the real folder: its lock and its stat cache (content.StatCache), nothing else.
    assert sorted(p.name for p in real.parent.iterdir()) == [
        ".s.zarr.lock", ".s.zarr.stat_cache.json", "s.zarr"]


def test_every_writer_takes_its_folders_lock(tmp_path, hold_lock):
    """train-backbone, import-run, export-run and sweep hold their output folder's writer
    lock like extract, fit and predict: with another process holding it they are refused
    naming that process, before reading anything."""
    from ddpmseg.backbone.train import train_backbone
    from ddpmseg.interop.reference_run import export_run, import_run
    from ddpmseg.config import Config
    from ddpmseg.pipelines.sweep import sweep

    store = _tiny_store(tmp_path)
    calls = {
        "backbone run dir": lambda out: train_backbone(tmp_path / "no-images", out, "faces_64",
                                                       steps=1, device="cpu", progress=False),
        "run dir": lambda out: import_run(tmp_path / "no-ref", out, Config()),
        "export folder": lambda out: export_run(tmp_path / "no-run", out),
        "sweep folder": lambda out: sweep(store, store, out),
    }
    for what, call in calls.items():
        out = tmp_path / what.replace(" ", "_")
        pid = hold_lock(out, what)
        with pytest.raises(LockedError, match=f"{what} {out} is being written by process {pid} "):
            call(out)
        assert not out.exists()
        hold_lock.release()
