"""predict, suggest and verify as dask tasks (a LocalCluster of 2 worker processes) write
byte for byte what one process writes; chunks come back in the images' order."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddpmseg.backbone.bundled import DEMO_DATA
from ddpmseg.classifier.train import fit
from ddpmseg.config import Config
from ddpmseg.pipelines import spread
from ddpmseg.pipelines.extract import extract
from ddpmseg.pipelines.predict import predict
from ddpmseg.pipelines.suggest import suggest
from ddpmseg.pipelines.verify import verify

pytestmark = pytest.mark.usefixtures("one_thread")

# predict.json's fields that say where and how long, not what.
VARYING = ("out_dir", "summary", "palette", "seconds")


def tree(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "predict.json":
                meta = json.loads(data)
                data = json.dumps({k: v for k, v in meta.items() if k not in VARYING}).encode()
            out[str(p.relative_to(path))] = data
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three demo faces with masks, their store and a 2-member run trained on it."""
    root = tmp_path_factory.mktemp("pool")
    images = root / "images"
    images.mkdir()
    for npy in sorted((DEMO_DATA / "train").glob("*.npy"))[:3]:
        shutil.copy(npy.with_suffix(".png"), images)
        shutil.copy(npy, images)
    cfg = Config().replace(
        data={"num_classes": 34},
        model={"preset": "faces_64", "checkpoint": "bundled:faces_64"},
        features={"steps": (50,), "blocks": (4, 5)},
        classifier={"ensemble": 2, "max_epochs": 1, "min_epochs": 1,
                    "pixels_per_batch": 256, "seed": 0})
    extract(images, root / "s.zarr", cfg, device="cpu", progress=False)
    run = fit(root / "s.zarr", root / "run", cfg, device="cpu", progress=False)
    return root, images, run


@pytest.mark.distributed
def test_predict_suggest_verify_on_dask_equal_one_process(pool, tmp_path):
    root, images, run = pool
    for source in (root / "s.zarr", images):
        for k, scheduler in enumerate((None, "local:2")):
            predict(run, source, tmp_path / f"{source.name}{k}", device="cpu",
                    uncertainty=True, images=images, progress=False, scheduler=scheduler)
        one, two = tree(tmp_path / f"{source.name}0"), tree(tmp_path / f"{source.name}1")
        assert sorted(one) == sorted(two) and len(one) > 20
        a, b = json.loads(one["predict.json"]), json.loads(two["predict.json"])
        assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}
        assert [f for f in one if one[f] != two[f]] == []
    for k, scheduler in enumerate((None, "local:2")):
        suggest(run, root / "s.zarr", tmp_path / f"suggest{k}", include_labelled=True,
                device="cpu", images=images, scheduler=scheduler)
    assert tree(tmp_path / "suggest0") == tree(tmp_path / "suggest1")
    assert len(tree(tmp_path / "suggest0")) == 2
    # One damaged chunk: the same list either way.
    chunk = next(p for p in sorted((root / "s.zarr").rglob("*"))
                 if p.is_file() and "act_" in str(p) and not p.name.startswith((".", "zarr")))
    saved = chunk.read_bytes()
    chunk.write_bytes(saved[:-7] + b"garbage")
    try:
        alone, spread_out = verify(root / "s.zarr"), verify(root / "s.zarr", "local:2")
    finally:
        chunk.write_bytes(saved)
    assert alone == spread_out and alone[0] == "store" and len(alone[1]) >= 1


def test_chunks_cover_the_items_in_order():
    items = list(range(10))
    for workers in (1, 2, 5):
        chunks = spread.chunked(items, workers)
        assert [i for c in chunks for i in c] == items
        assert all(c for c in chunks)
    assert spread.chunked([], 2) == []


def test_opened_outside_a_worker_makes_afresh():
    from ddpmseg.core.cluster import opened

    made = []
    assert opened("k", lambda: made.append(1) or 7) == 7
    assert opened("k", lambda: made.append(1) or 7) == 7
    assert made == [1, 1]


def test_pictures_for_the_first_images_only_unless_asked(pool, tmp_path, monkeypatch, caplog):
    from ddpmseg.pipelines import predict as prediction

    root, images, run = pool
    monkeypatch.setattr(prediction, "PICTURE_IMAGES", 1)
    with caplog.at_level("INFO"):
        res = predict(run, root / "s.zarr", tmp_path / "few", device="cpu", uncertainty=True,
                      progress=False)
    first, *rest = res["names"]
    assert "overlay" in res["outputs"][first] and "uncertainty" in res["outputs"][first]
    assert all(set(res["outputs"][n]) == {"npy", "png", "entropy", "jsd"} for n in rest)
    assert not (tmp_path / "few" / f"{rest[0]}_overlay.png").exists()
    assert [r.message for r in caplog.records if "first 1 of 3" in r.message] == [
        "overlays and uncertainty pictures for the first 1 of 3 images only, label maps for "
        "all (`all_pictures=True` draws them all)"]
    res = predict(run, root / "s.zarr", tmp_path / "all", device="cpu", progress=False,
                  all_pictures=True)
    assert all("overlay" in res["outputs"][n] for n in res["names"])
    assert np.array_equal(np.load(tmp_path / "few" / f"{rest[0]}.npy"),
                          np.load(tmp_path / "all" / f"{rest[0]}.npy"))


@pytest.mark.distributed
def test_relative_paths_reach_a_worker_in_another_folder(pool, tmp_path, monkeypatch,
                                                         tcp_cluster):
    """The worker runs in a folder of its own: the client's relative paths are made absolute
    before they reach it."""
    import os

    root, images, run = pool
    monkeypatch.chdir(tmp_path)
    rel_run, rel_store = os.path.relpath(run), os.path.relpath(root / "s.zarr")
    predict(rel_run, rel_store, "alone", device="cpu", progress=False)
    predict(rel_run, rel_store, "spread", device="cpu", progress=False,
            scheduler=tcp_cluster.address)
    assert tree(tmp_path / "alone") == tree(tmp_path / "spread")
    assert verify(rel_store, tcp_cluster.address) == verify(rel_store) == ("store", [])
