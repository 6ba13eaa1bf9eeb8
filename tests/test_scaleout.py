import os

import pytest

from ddpmseg.core.errors import ConfigError
from ddpmseg.core.cluster import connect


@pytest.mark.distributed
def test_local_cluster_leaves_this_process_environment_alone():
    before = dict(os.environ)
    client, cluster = connect("local:1", default_workers=1)
    try:
        assert len(client.scheduler_info()["workers"]) == 1
        assert dict(os.environ) == before
    finally:
        client.close()
        cluster.close()


@pytest.mark.parametrize("text", ["local:x", "local:0", "somewhere"])
def test_bad_scheduler_strings(text):
    with pytest.raises(ConfigError, match="bad scheduler"):
        connect(text, default_workers=1)
