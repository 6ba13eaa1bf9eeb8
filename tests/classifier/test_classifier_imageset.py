"""A run records the image set it was trained on: a changed store is never silently mixed into
it, predict warns when the run is older than its store's labels, and pruned images are never
trained on."""

import json
import logging

import numpy as np
import pytest

from ddpmseg.classifier import fit
from ddpmseg.classifier.sampler import PixelIndex
from ddpmseg.core.errors import RunError
from ddpmseg.featcache import FeatureStore, content
from ddpmseg.pipelines.predict import predict


def hashed_store(make_store, path):
    store = make_store(path)
    hashes = {n: [f"img-{n}", f"mask-{n}"] for n in store.names}
    content.write_state(store, store.info, content.ImageState(hashes))
    return FeatureStore.open(path, mode="r+")


@pytest.mark.slow
def test_run_records_its_images_and_refuses_a_changed_store(make_store, small_config,
                                                            tmp_path, caplog):
    store = hashed_store(make_store, tmp_path / "s.zarr")
    run = fit(store, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
              progress=False)
    recorded = json.loads((run / "store.json").read_text())["images"]
    assert recorded == {n: [f"img-{n}", f"mask-{n}"] for n in store.names}

    # A corrected mask of img001 since the fit.
    state = content.read_state(store)
    state.hashes["img001"][1] = "mask-img001-v2"
    lab = store.labels(1).copy()
    lab[:4] = 0
    store.write_labels(1, lab)
    content.write_state(store, store.info, state)

    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        predict(run, tmp_path / "s.zarr", tmp_path / "pred", device="cpu", progress=False)
    assert "older than the labels" in caplog.text and "img001" in caplog.text

    # Resuming the run (more members) on the changed store would mix two label sets.
    with pytest.raises(RunError, match=r"earlier state of the store.*1 image\(s\) with another "
                                       r"mask: img001"):
        fit(store, run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    # --overwrite (resume=False) starts over on the store as it is now.
    fit(store, run, small_config(ensemble=1, max_epochs=1), device="cpu", progress=False,
        resume=False)
    assert json.loads((run / "store.json").read_text())["images"]["img001"][1] == \
        "mask-img001-v2"


def test_pruned_images_are_never_trained_on(make_store, small_config, tmp_path):
    store = hashed_store(make_store, tmp_path / "s.zarr")
    full = PixelIndex.from_store(store)
    state = content.read_state(store)
    content.write_state(store, store.info, content.ImageState(state.hashes, ("img002",)))
    store = FeatureStore.open(tmp_path / "s.zarr")
    index = PixelIndex.from_store(store)
    assert index.counts[2] == 0
    np.testing.assert_array_equal(np.delete(index.counts, 2), np.delete(full.counts, 2))
    run = fit(store, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
              progress=False)
    assert sorted(json.loads((run / "store.json").read_text())["images"]) == \
        ["img000", "img001", "img003"]
