"""What a user sees on the way from a folder to results (issue 11): one-line errors, nothing
left behind by a failed run, results on stdout, one spelling per option, readable messages."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import cli
from ddpmseg.featcache.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRACT = ["--preset", "faces_64", "--checkpoint", "bundled:faces_64", "--num-classes", "34",
           "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(res, code=1):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], res.stderr
    assert res.stderr.rstrip().endswith(lines[0])  # the last line, after any progress notes
    return lines[0]


@pytest.fixture(scope="module")
def data(two_faces):
    return two_faces


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A store of the two images (`--preset faces_64` alone: its usual steps and blocks) and
    a one-member run trained on it."""
    root = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    res = invoke("extract", data, root / "s.zarr", *EXTRACT)
    assert res.exit_code == 0, res.output
    res = invoke("fit", root / "s.zarr", root / "run", "--ensemble", "1", "--max-epochs", "1",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    return root


def test_preset_alone_brings_its_steps_and_blocks(trained):
    info = FeatureStore.open(trained / "s.zarr").info
    assert info.steps == (50, 150, 250) and info.blocks == (2, 4, 5, 7, 8)


def test_preset_alone_uses_the_bundled_checkpoint(data, tmp_path):
    res = invoke("extract", data, tmp_path / "x.zarr", "--preset", "faces_64", "--num-classes",
                 "34", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "using the one bundled with preset faces_64 (bundled:faces_64)" in res.stderr
    assert res.stdout.startswith(f"{tmp_path / 'x.zarr'}: 2 images, 1344 dims per pixel")


def test_out_of_range_block_names_the_valid_ones(data, tmp_path):
    res = invoke("extract", data, tmp_path / "x.zarr", *EXTRACT, "--blocks", "12")
    line = one_error_line(res, 2)
    assert "block 12 is out of range: this model's blocks are 0..11" in line
    assert "faces_64: 2,4,5,7,8" in line
    assert not (tmp_path / "x.zarr").exists()


def test_results_on_stdout_logs_on_stderr_no_progress_off_a_terminal(trained):
    res = invoke("fit", trained / "s.zarr", trained / "run", "--ensemble", "1",
                 "--max-epochs", "1", "--device", "cpu")
    assert res.exit_code == 0
    assert res.stdout.startswith(f"{trained / 'run'}: 1 member, 34 classes")
    assert "epochs trained: 1" in res.stdout
    assert "\r" not in res.stderr  # CliRunner's stderr is no terminal: no progress bar


def test_global_options_after_the_command(trained, tmp_path):
    res = invoke("predict", trained / "run", trained / "s.zarr", tmp_path / "p", "-q")
    assert res.exit_code == 0 and res.stderr == ""
    assert res.stdout.startswith("predicted 2 images")
    # --debug after the command: the traceback instead of the one line.
    res = invoke("predict", trained / "run", tmp_path / "nope", tmp_path / "p2", "--debug")
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)


def test_deprecated_spelling_works_with_a_note(trained, tmp_path):
    res = invoke("fit", trained / "s.zarr", tmp_path / "run", "--ensemble", "1", "--epochs", "1",
                 "--ram-budget", "1", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "warning: --epochs is deprecated" in res.stderr and "use --max-epochs" in res.stderr
    assert "use --ram-budget-gb" in res.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["classifier"]
    assert cfg["max_epochs"] == 1 and cfg["ram_budget_gb"] == 1.0


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_is_a_file_one_line(trained, tmp_path, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    line = one_error_line(invoke("predict", trained / "run", trained / "s.zarr", out))
    assert str(out) in line and "a file stands where a folder is needed" in line


@pytest.mark.parametrize("scheduler, says", [("foo://x", "unknown protocol 'foo'"),
                                             ("tcp://127.0.0.1:1", "cannot reach"),
                                             ("local:x", "whole number")])
def test_bad_scheduler_one_line_and_nothing_written(data, trained, tmp_path, scheduler, says):
    res = invoke("extract", data, tmp_path / "x.zarr", *EXTRACT, "--scheduler", scheduler)
    assert says in one_error_line(res, 2)
    res = invoke("fit", trained / "s.zarr", tmp_path / "run", "--scheduler", scheduler)
    assert says in one_error_line(res, 2)
    assert list(tmp_path.iterdir()) == []


def test_truncated_image_leaves_no_store(data, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(data, folder)
    victim = sorted(folder.glob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:2000])
    line = one_error_line(invoke("extract", folder, tmp_path / "x.zarr", *EXTRACT))
    assert victim.name in line and "truncated" in line
    assert not (tmp_path / "x.zarr").exists()


def test_predict_replaces_an_earlier_prediction(trained, tmp_path):
    out = tmp_path / "p"
    assert invoke("predict", trained / "run", trained / "s.zarr", out, "--uncertainty",
                  "--report").exit_code == 0
    assert len(list(out.glob("*_uncertainty.png"))) == 2
    (out / "mine.txt").write_text("a user's file")
    assert invoke("predict", trained / "run", trained / "s.zarr", out).exit_code == 0
    assert not list(out.glob("*_uncertainty.png")) and not list(out.glob("*_entropy.npy"))
    assert not (out / "report").exists()
    assert (out / "mine.txt").read_text() == "a user's file"


def test_predict_never_writes_over_a_data_folder(trained, data, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(data, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_error_line(invoke("predict", trained / "run", trained / "s.zarr", folder))
    assert "no earlier `ddpmseg predict` wrote" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_corrupt_store_leaves_no_partial_prediction(trained, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(trained / "s.zarr", bad)
    # The last chunk file: image 1's (format 2), or the shard of both images (format 3).
    chunk = sorted(p for p in (bad / "act_t250_b8" / "c").rglob("*") if p.is_file())[-1]
    raw = bytearray(chunk.read_bytes())
    raw[50] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    line = one_error_line(invoke("predict", trained / "run", bad, tmp_path / "p"))
    assert "corrupt" in line
    assert not (tmp_path / "p").exists()


def test_store_labels_as_ground_truth_and_resized_masks(trained, data, tmp_path):
    out = tmp_path / "p"
    assert invoke("predict", trained / "run", trained / "s.zarr", out).exit_code == 0
    from_store = invoke("evaluate", out, trained / "s.zarr")  # labels after the rare-class rule
    assert from_store.exit_code == 0, from_store.output
    assert "mIoU" in from_store.stdout and "over 34 classes, 2 images" in from_store.stdout
    same_size = invoke("evaluate", out, data, "--num-classes", "34")
    # Masks at 4x the size, resized back with nearest neighbour: the same figure.
    big = tmp_path / "big"
    big.mkdir()
    for npy in data.glob("*.npy"):
        np.save(big / npy.name, np.load(npy).repeat(4, 0).repeat(4, 1))
    line = one_error_line(invoke("evaluate", out, big, "--num-classes", "34"))
    assert "pass --resize" in line
    resized = invoke("evaluate", out, big, "--num-classes", "34", "--resize")
    assert resized.exit_code == 0
    miou = [ln for ln in same_size.stdout.splitlines() if ln.startswith("mIoU")]
    assert miou and miou == [ln for ln in resized.stdout.splitlines() if ln.startswith("mIoU")]


def test_check_checkpoint_names_preset_and_dtype(tmp_path):
    res = invoke("check-checkpoint", "bundled:faces_64")
    assert res.exit_code == 0 and "dtype: float16" in res.stdout
    line = one_error_line(invoke("check-checkpoint", "--checkpoint", "bundled:faces_64",
                                 "--preset", "lsun_256"))
    assert line.endswith("pass --preset faces_64") and len(line) < 400
    (tmp_path / "g.pt").write_bytes(bytes(range(256)) * 4)
    line = one_error_line(invoke("check-checkpoint", tmp_path / "g.pt"))
    assert "not a PyTorch file" in line and "weights_only" not in line


def test_webp_images_are_read_and_other_files_named(data, tmp_path, caplog):
    from ddpmseg.data import list_samples

    png = sorted(data.glob("*.png"))[0]
    Image.open(png).save(tmp_path / "a.webp")
    shutil.copy(png.with_suffix(".npy"), tmp_path / "a.npy")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    samples = list_samples(tmp_path)
    assert [(s.name, s.mask.name) for s in samples] == [("a", "a.npy")]
    assert "notes.gif" in caplog.text


def test_resize_says_when_it_stretches(tmp_path, caplog):
    from ddpmseg.data import check_image_size, image_hw, load_image

    Image.new("RGB", (128, 64)).save(tmp_path / "wide.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "square.png")
    check_image_size(tmp_path / "square.png", image_hw(tmp_path / "square.png"), (64, 64), True)
    assert "stretches" not in caplog.text
    check_image_size(tmp_path / "wide.png", image_hw(tmp_path / "wide.png"), (64, 64),
                     "stretch")
    assert "wide.png is 128x64; `resize=stretch` stretches it to 64x64" in caplog.text
    assert load_image(tmp_path / "wide.png", (64, 64), resize=True).shape == (64, 64, 3)


@pytest.mark.slow
def test_demo_prints_its_table_on_stdout(monkeypatch, tmp_path):
    import importlib

    demo_cli = importlib.import_module("ddpmseg.pipelines.demo")
    result = {"miou": 0.5, "num_classes": 2, "num_images": 1, "ignore_label": 255,
              "mask_ignore": False, "report": "r/index.html",
              "classes": [{"index": i, "name": f"c{i}", "iou": 0.5, "gt_pixels": 1,
                           "pred_pixels": 1, "intersection": 1, "union": 2} for i in range(2)]}
    monkeypatch.setattr(demo_cli, "demo", lambda *a, **k: result)
    res = invoke("-q", "demo", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "mIoU 50.00 %" in res.stdout and res.stdout.rstrip().endswith("r/index.html")


def test_format_1_store_still_reads(trained, data, tmp_path):
    old = tmp_path / "old.zarr"   # format 2 (one file per image per array), made format 1
    res = invoke("extract", data, old, *EXTRACT, "--images-per-shard", "0")
    assert res.exit_code == 0, res.output
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["ddpmseg"]["format_version"] = 1
    meta["attributes"].pop("ddpmseg_digest")  # format 1 was written before the digest
    meta["attributes"].pop("writer")  # and before the writer token and records
    shutil.rmtree(old / "writer")
    (old / "zarr.json").write_text(json.dumps(meta))
    # and named every array's dimensions alike, whatever their sizes
    format_1_dims = {4: ["image", "channel", "y", "x"], 3: ["image", "y", "x"], 1: ["image"]}
    for path in old.glob("*/zarr.json"):
        arr = json.loads(path.read_text())
        arr["dimension_names"] = format_1_dims[len(arr["dimension_names"])]
        path.write_text(json.dumps(arr))
    store = FeatureStore.open(old)
    assert store.info.format_version == 1
    np.testing.assert_array_equal(store.labels(0), FeatureStore.open(trained / "s.zarr").labels(0))


def test_unwritable_folder_one_line(trained, tmp_path, monkeypatch):
    # Tests run as root here, where chmod cannot make a folder unwritable: raise what the OS
    # raises for a user without permission.
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "locked"
    line = one_error_line(invoke("predict", trained / "run", trained / "s.zarr", out))
    assert line == f"error: Permission denied: {out}; check its permissions, or choose another path"


def test_resuming_fit_with_another_ram_budget_says_so(trained, tmp_path):
    run = tmp_path / "run"
    args = ["fit", trained / "s.zarr", run, "--ensemble", "2", "--max-epochs", "1",
            "--device", "cpu"]
    shutil.copytree(trained / "run", run)  # member 1 of 2 done, with the default 2 GB budget
    res = invoke(*args, "--ram-budget-gb", "3")
    assert res.exit_code == 0, res.output
    assert "note: ram_budget_gb is 3.0 now, 2.0 when the run started; resuming" in res.stderr


def test_max_image_pixels_means_n_in_every_reading_command(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    for name in ("pred", "gt"):
        (tmp_path / name).mkdir()
    np.save(tmp_path / "pred" / "a.npy", np.zeros((40, 50), np.uint8))
    (tmp_path / "pred" / "predict.json").write_text('{"names": ["a"]}')
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "gt" / "a.png")
    res = invoke("evaluate", tmp_path / "pred", tmp_path / "gt", "--num-classes", 2,
                 "--max-image-pixels", 1999)
    line = one_error_line(res)
    assert "a.png is 50x40 = 2000 pixels, above the limit of 1999" in line
    assert not (tmp_path / "pred" / "metrics.json").exists()
    for command in ("report", "suggest", "predict", "extract"):
        assert "--max-image-pixels" in invoke(command, "--help").output


def test_wrong_architecture_checkpoint_is_one_short_line(data, tmp_path):
    """extract with a checkpoint of another preset than the config's says which preset loads
    it (as check-checkpoint does), not 2000 characters of state-dict keys."""
    one = tmp_path / "one"
    one.mkdir()
    first = sorted(data.glob("*.png"))[0]
    shutil.copy(first, one)
    shutil.copy(first.with_suffix(".npy"), one)
    line = one_error_line(invoke("extract", one, tmp_path / "x.zarr", "--preset", "lsun_256",
                                 "--checkpoint", "bundled:faces_64", "--num-classes", "34",
                                 "--resize", "--device", "cpu"))
    assert "does not fit preset lsun_256 (" in line and line.endswith("pass --preset faces_64")
    assert len(line) < 400 and not (tmp_path / "x.zarr").exists()
