"""Extraction as dask.distributed tasks (LocalCluster, 2 worker processes) equals one process."""

import pytest

from ddpmseg.core.errors import ConfigError
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract


@pytest.mark.distributed
@pytest.mark.parametrize("per_shard", [2, 64], ids=["two_shards", "one_shard"])
def test_local_cluster_store_equals_single_process(tmp_path, faces_dir, faces_config, helpers,
                                                   per_shard):
    # Shards of 2: two tasks, one per shard, on two workers (each writes only its shard).
    single = extract(faces_dir, tmp_path / "single.zarr", faces_config, device="cpu",
                     progress=False, images_per_shard=per_shard)
    dist = extract(faces_dir, tmp_path / "dist.zarr", faces_config, device="cpu",
                   scheduler="local:2", progress=False, images_per_shard=per_shard)
    assert dist.complete().all() and len(dist) == len(single) == 4
    a, b = helpers.tree_bytes(tmp_path / "single.zarr"), helpers.tree_bytes(tmp_path / "dist.zarr")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_bad_scheduler_is_a_config_error(tmp_path, synthetic_dir, fake_config, fake_backbone):
    with pytest.raises(ConfigError, match="scheduler"):
        extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                scheduler="nonsense", progress=False)
    # Workers load the model themselves: a backbone object without a checkpoint cannot go.
    with pytest.raises(ConfigError, match="checkpoint"):
        extract(synthetic_dir, tmp_path / "t.zarr", fake_config, backbone=fake_backbone(),
                scheduler="local:1", progress=False)
    assert not FeatureStore.open(tmp_path / "t.zarr").complete().any()


def test_a_worker_keeps_its_backbone_in_its_own_plugin(monkeypatch):
    """The loaded model is state of the dask worker (its core.cluster.Opened plugin), loaded once
    per model and replaced by another; nothing is kept in the module or outside a worker."""
    from distributed import Client, LocalCluster

    from ddpmseg.core.cluster import Opened
    from ddpmseg.pipelines import extract as extraction

    loads = []

    def load(source):
        loads.append(source["checkpoint"])
        return object()

    monkeypatch.setattr(extraction, "_load_source", load)
    a, b = ({"checkpoint": name, "flags": {}, "device": "cpu"} for name in ("a.pt", "b.pt"))
    assert extraction._task_backbone(a) is not extraction._task_backbone(a)  # not on a worker
    assert loads == ["a.pt", "a.pt"] and not hasattr(extraction, "_WORKER_BACKBONES")
    loads.clear()

    def on_worker():
        from distributed import get_worker
        first = extraction._task_backbone(a)
        kept = extraction._task_backbone(a) is first
        other = extraction._task_backbone(b)
        cache = get_worker().plugins[Opened.name]
        return kept, cache.value is other and other is not first

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(Opened())
        assert client.submit(on_worker, pure=False).result() == (True, True)
    assert loads == ["a.pt", "b.pt"]
