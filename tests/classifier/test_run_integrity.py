"""Issue 17 on the run side: one writer per run dir, member and header checksums, non-finite
loss, leftovers of a killed fit."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from ddpmseg.classifier import fit, load_ensemble
from ddpmseg.classifier import run as run_folder
from ddpmseg.classifier import train
from ddpmseg.cli.main import cli
from ddpmseg.core.errors import RunError
from ddpmseg.core.locking import LockedError, writer_lock
from ddpmseg.pipelines.verify import verify_run


def _states(run):
    return [{k: v.clone() for k, v in m.state_dict().items()}
            for m in load_ensemble(run, "cpu").members]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def trained(store_path, small_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    fit(store_path, run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    return run, _states(run)


def test_a_flipped_member_is_refused_and_retrained_identically(trained, store_path,
                                                              small_config, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    member = run_folder.member_path(run, 1)
    raw = bytearray(member.read_bytes())
    raw[len(raw) - 300] ^= 0x40  # one flipped bit near the end of the file
    member.write_bytes(bytes(raw))
    with pytest.raises(RunError, match=r"member_01\.pt does not match its checksum in "
                                       r"manifest\.json"):
        load_ensemble(run, "cpu")
    [damage] = verify_run(run)
    assert damage.what == "member_01.pt"
    out = CliRunner().invoke(cli, ["predict", str(run), str(store_path), str(tmp_path / "p")])
    assert out.exit_code == 1 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: ") and "member_01.pt" in out.stderr
    member.unlink()
    fit(store_path, run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    assert _same(_states(run), trained[1])
    assert verify_run(run) == []


def test_a_changed_header_is_refused(trained, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    text = (run / "store.json").read_text().replace('"c1"', '"cX"')
    (run / "store.json").write_text(text)
    with pytest.raises(RunError, match=r"store\.json does not match its checksum"):
        load_ensemble(run, "cpu")


def test_a_second_fit_into_the_same_run_dir_is_refused(store_path, small_config, tmp_path):
    run = tmp_path / "run"
    with writer_lock(run, "run dir"):
        with pytest.raises(LockedError, match=rf"run dir .*run is being written by process "
                                              rf"{os.getpid()}"):
            fit(store_path, run, small_config(ensemble=1, max_epochs=1), device="cpu",
                progress=False)
    assert not run.exists()  # refused before anything was written


def test_leftovers_of_a_killed_fit_are_cleaned_and_retrained(trained, store_path, small_config,
                                                            tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    # Killed while saving member 1: its temporary file; or between saving it and recording
    # it in the manifest: a member file the manifest does not list.
    (run / ".member_01.pt.4242.tmp").write_bytes(b"half")
    run_folder.record_files(run, [], forget=["member_01.pt"])
    run_folder.member_path(run, 1).write_bytes(run_folder.member_path(run, 0).read_bytes())
    fit(store_path, run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    assert not list(run.glob(".*.tmp"))
    assert _same(_states(run), trained[1])


def test_a_non_finite_loss_stops_fit_naming_member_and_epoch(store_path, small_config,
                                                             tmp_path, monkeypatch):
    real = train.F.cross_entropy

    def nan_loss(*a, **kw):
        return real(*a, **kw) * float("nan")
    monkeypatch.setattr(train.F, "cross_entropy", nan_loss)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"member 0, epoch 0: the training loss is nan"):
        fit(store_path, run, small_config(ensemble=1, max_epochs=2), device="cpu",
            progress=False)
    assert not list(run.glob("member_*.pt"))


def test_fit_on_a_full_disk_is_one_line_and_resumes(store_path, small_config, tiny_disk,
                                                    tmp_path):
    """torch.save onto a full disk used to end in "RuntimeError: [enforce fail at
    inline_container.cc...]": now one line naming the run dir and the free space, and the
    same command resumes once there is room."""
    import shutil

    from ddpmseg.core.fileio import size_text

    measured = tmp_path / "measured"
    config = small_config(ensemble=1, max_epochs=1)
    fit(store_path, measured, config, device="cpu", progress=False)
    member = run_folder.member_path(measured, 0).stat().st_size
    header = sum(p.stat().st_size for p in measured.iterdir() if p.suffix != ".pt")
    disk = tiny_disk((header + member // 2) // 1024 + 16)
    run = disk / "run"
    from ddpmseg.core.errors import OutputError
    with pytest.raises(OutputError) as failed:
        fit(store_path, run, config, device="cpu", progress=False)
    assert str(failed.value).startswith(f"no space left on the device writing the run dir "
                                        f"{run}: about ")
    assert f"{size_text(shutil.disk_usage(disk).free)} free" in str(failed.value)
    assert "\n" not in str(failed.value)
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))
    tiny_disk.grow(disk, 4 * member // 1024 + 256)
    fit(store_path, run, config, device="cpu", progress=False)
    assert _same(_states(run), _states(measured))


def test_fit_while_extract_writes_the_store_names_the_writer(store_path, small_config,
                                                             hold_lock, tmp_path):
    """fit during `extract --compact` used to read the store while compaction swapped a new
    one in under it, and call the chunks it no longer found damage ("--repair"). fit reads
    the store under a shared lock: a writer at work is named in one line, nothing written."""
    pid = hold_lock(store_path, "store")
    run = tmp_path / "run"
    with pytest.raises(LockedError) as refused:
        fit(store_path, run, small_config(ensemble=1, max_epochs=1), device="cpu",
            progress=False)
    assert str(refused.value).startswith(f"store {store_path} is being written by process "
                                         f"{pid} ")
    assert "repair" not in str(refused.value) and not run.exists()
    hold_lock.release()


def test_extract_while_fit_reads_the_store_is_refused(store_path, small_config, tmp_path,
                                                      monkeypatch):
    """The other way round: a writer (extract, --compact or not) started while a fit reads
    the store fails at once instead of rewriting it under the fit."""
    seen = []

    def write_during_fit(*args, **kwargs):
        with pytest.raises(LockedError) as refused:
            with writer_lock(store_path, "store"):
                pass
        seen.append(str(refused.value))
        return real(*args, **kwargs)

    real = train._fit_locked
    monkeypatch.setattr(train, "_fit_locked", write_during_fit)
    fit(store_path, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
        progress=False)
    assert seen == [f"store {store_path} is being read by another process (lock "
                    f"{store_path.parent / ('.' + store_path.name + '.lock')}); wait for it "
                    f"(a fit, say) to finish"]
    with writer_lock(store_path, "store"):  # free once the fit is done
        pass
