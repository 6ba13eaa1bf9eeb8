"""Extraction as dask.distributed tasks (LocalCluster, 2 worker processes) equals one process."""

import pytest

from ddpmseg.core.errors import ConfigError
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract


@pytest.mark.distributed
def test_local_cluster_store_equals_single_process(tmp_path, faces_dir, faces_config, helpers):
    single = extract(faces_dir, tmp_path / "single.zarr", faces_config, device="cpu",
                     progress=False)
    dist = extract(faces_dir, tmp_path / "dist.zarr", faces_config, device="cpu",
                   scheduler="local:2", progress=False)
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
