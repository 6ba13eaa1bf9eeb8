"""A killed extract resumes to a store byte-identical, file by file, to an uninterrupted run."""

import subprocess
import sys
import textwrap

import pytest

from ddpmseg.featcache import FeatureStore

SCRIPT = textwrap.dedent("""
    import sys, time
    from ddpmseg.backbone import Backbone
    from ddpmseg.config import Config
    from ddpmseg.pipelines.extract import extract

    data, store, ckpt, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    per_shard = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    real = Backbone.from_checkpoint(ckpt, "faces_64")

    class Slow:
        # The real backbone, slowed down so that the test can kill it part-way.
        def __getattr__(self, name):
            return getattr(real, name)

        def activations(self, *args, **kwargs):
            time.sleep(delay)
            return real.activations(*args, **kwargs)

    cfg = Config().replace(
        data={"num_classes": 34},
        model={"preset": "faces_64", "checkpoint": ckpt},
        features={"steps": (10, 400), "blocks": (2, 5, 8, 11)})
    extract(data, store, cfg, ckpt, backbone=Slow(), progress=False, images_per_shard=per_shard)
    print("done")
""")


def run(script, args, **kw):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def count_complete(path) -> int:
    try:
        return int(FeatureStore.open(path).complete().sum())
    except Exception:  # noqa: BLE001 - not created yet, or the flags array not yet there
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("per_shard", [0, 2], ids=["format2", "format3"])
def test_killed_extract_resumes_bit_identical(tmp_path, faces, faces64_ckpt, helpers, per_shard):
    folder = helpers.make_folder(tmp_path / "data", [f[1] for f in faces],
                                 [f[2] for f in faces], [f[0] for f in faces])
    script = tmp_path / "run_extract.py"
    script.write_text(SCRIPT)
    killed, full = tmp_path / "killed.zarr", tmp_path / "full.zarr"

    helpers.sigkill_when(run(script, [folder, killed, faces64_ckpt, 0.6, per_shard]),
                         lambda: count_complete(killed) >= 2)
    done_at_kill = count_complete(killed)
    assert 2 <= done_at_kill < len(faces), "the kill came too late to test resumption"

    for path in (killed, full):  # resume the killed run; one uninterrupted run
        proc = run(script, [folder, path, faces64_ckpt, 0, per_shard])
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()

    assert FeatureStore.open(killed).complete().all()
    resumed, uninterrupted = helpers.tree_bytes(killed), helpers.tree_bytes(full)
    assert sorted(resumed) == sorted(uninterrupted)
    assert [k for k in resumed if resumed[k] != uninterrupted[k]] == []
