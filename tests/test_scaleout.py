import os

import pytest

from ddpmseg.core.cluster import connect, parse_scheduler, run_tasks
from ddpmseg.core.errors import ConfigError


@pytest.mark.distributed
def test_local_cluster_leaves_this_process_environment_alone(monkeypatch):
    # The nanny would write these into this process's environment before spawning a worker
    # (the module used to put everything back with os.environ.clear()): the workers get them
    # as their own environment instead, and nothing here changes at any time.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "__DASK_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    writes = []
    real_update = type(os.environ).update

    def spy(self, *args, **kwargs):
        if self is os.environ:
            writes.append(dict(*args, **kwargs))
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(type(os.environ), "update", spy)
    client, cluster = connect("local:1", default_workers=1)
    try:
        assert len(client.scheduler_info()["workers"]) == 1
        # (distributed marks itself the parent of its workers for their process titles,
        # outside the nanny's reach; that marker changes nothing else.)
        after = {k: v for k, v in os.environ.items() if k != "__DASK_PARENT_PID"}
        assert after == before
        assert [w for w in writes if w] == []
        seen = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
        assert list(seen.values()) == ["1"]
    finally:
        client.close()
        cluster.close()


def _threads_and_value(value):
    import torch

    return torch.get_num_threads(), value * 2


def test_run_tasks_gives_each_task_the_client_thread_count():
    got = sorted(run_tasks("local:1", _threads_and_value, [(1,), (2,)], name="test", threads=2,
                           default_workers=1, doing="testing", kept="nothing"))
    assert got == [(2, 2), (2, 4)]


@pytest.mark.parametrize("text", ["local:x", "local:0", "somewhere", "ftp://a:1", "tcp://host"])
def test_bad_scheduler_strings(text):
    with pytest.raises(ConfigError, match="bad scheduler"):
        connect(text, default_workers=1)
    with pytest.raises(ConfigError, match="bad scheduler"):
        parse_scheduler(text)


def test_scheduler_strings():
    assert parse_scheduler(" local ").workers is None
    assert parse_scheduler("local:3").workers == 3 and parse_scheduler("local:3").local
    remote = parse_scheduler("tcp://10.0.0.2:8786")
    assert (remote.local, remote.host, remote.port) == (False, "10.0.0.2", 8786)
