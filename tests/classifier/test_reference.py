"""Reference interop on ../shared/fixtures/reference_run: its ddpm.json as a config, its
model_{i}.pth as a run, predictions equal to the reference's own, and export/import round trips."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ddpmseg
from ddpmseg.classifier import PixelMLP, load_ensemble
from ddpmseg.interop.reference_run import export_run, import_run, read_reference_member
from ddpmseg.classifier.run import record_files
from ddpmseg.cli.main import cli
from ddpmseg import load_config
from ddpmseg.core.errors import ConfigError, RunError

NAMES = ("img00000599", "img00000829", "img00001927", "img00008529")


@pytest.fixture(scope="module")
def ref(shared_dir, missing_shared):
    path = shared_dir / "fixtures" / "reference_run"
    if not path.is_dir():
        missing_shared(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def imported(ref, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    import_run(ref / "pixel_classifiers", run, load_config(ref / "ddpm.json"))
    return run


def _states(run):
    return [m.state_dict() for m in load_ensemble(run, "cpu").members]


def _write_json(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return path


def _copy_fixture_json(ref, tmp_path):
    """The fixture's ddpm.json beside a link to the backbones, so its relative model_path holds."""
    (tmp_path / "a").mkdir()
    (tmp_path / "backbones").symlink_to(ref.parents[1] / "backbones")
    dst = tmp_path / "a" / "ref"
    dst.mkdir()
    shutil.copy(ref / "ddpm.json", dst / "ddpm.json")
    return dst / "ddpm.json"


# -- the config -------------------------------------------------------------------------------
def test_ddpm_json_maps_to_config(ref):
    cfg = load_config(ref / "ddpm.json")
    assert (cfg.data.name, cfg.data.num_classes, cfg.data.ignore_label) == ("ffhq_34", 34, 255)
    assert cfg.features.steps == (50, 150, 250) and cfg.features.blocks == (2, 4, 5, 7, 8)
    assert cfg.features.seed == 0
    assert (cfg.classifier.ensemble, cfg.classifier.pixels_per_batch, cfg.classifier.etf) == \
        (3, 64, "none")
    assert cfg.predict.vote == "hard"
    assert cfg.model.checkpoint == str((ref.parents[1] / "backbones/adm_faces64/adm_faces64.pt")
                                       .resolve())
    assert cfg.data.train_dir == str((ref / "data" / "train").resolve())
    assert cfg.data.test_dir == str((ref / "data" / "test").resolve())


@pytest.mark.parametrize("key, value", [("share_noise", False), ("upsample_mode", "nearest"),
                                        ("input_activations", True)])
def test_other_features_are_refused_in_one_line(ref, tmp_path, key, value):
    path = _write_json(_copy_fixture_json(ref, tmp_path), **{key: value})
    with pytest.raises(ConfigError, match=key) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(cli, ["import-run", str(ref / "pixel_classifiers"),
                                      str(tmp_path / "run"), "--config", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_ddpm_json_without_share_noise_is_refused(ref, tmp_path):
    path = _copy_fixture_json(ref, tmp_path)
    raw = json.loads(path.read_text())
    del raw["share_noise"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="no share_noise key"):
        load_config(path)


def test_class_names_of_a_ddpm_json_are_read_and_checked(ref, tmp_path):
    path = _copy_fixture_json(ref, tmp_path)
    names = [f"part {i}" for i in range(34)]
    _write_json(path, class_names=names)
    assert load_config(path).data.class_names == tuple(names)
    _write_json(path, class_names=names[:3])
    with pytest.raises(ConfigError, match="class_names must be a list of 34 strings"):
        load_config(path)


def test_model_path_relative_to_the_working_directory(ref, tmp_path, monkeypatch):
    """The reference's own configs name paths from its repository root, where it runs."""
    shutil.copy(ref / "ddpm.json", tmp_path / "ddpm.json")
    monkeypatch.chdir(ref)
    cfg = load_config(tmp_path / "ddpm.json")
    assert cfg.model.checkpoint == str((ref / "../../backbones/adm_faces64/adm_faces64.pt")
                                       .resolve())
    assert cfg.data.test_dir == str((ref / "data" / "test").resolve())


def test_a_published_style_256px_config_needs_no_flags_file(tmp_path, caplog):
    """The reference's benchmark configs: 256px, paths from its repository root, a
    validation_path; flags default to the published checkpoints' architecture."""
    path = tmp_path / "experiments" / "ffhq_34" / "ddpm.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "exp_dir": "pixel_classifiers/ffhq_34/ddpm", "model_type": "ddpm",
        "category": "ffhq_34", "number_class": 34, "ignore_label": 255,
        "training_path": "datasets/ffhq_34/real/train",
        "validation_path": "datasets/ffhq_34/ddpm",
        "testing_path": "datasets/ffhq_34/real/test", "model_path": "checkpoints/ddpm/ffhq.pt",
        "dim": [256, 256, 8192], "steps": [50, 150, 250, 350], "blocks": [6, 7, 8, 9],
        "model_num": 10, "batch_size": 64, "max_training": 30, "training_number": 20,
        "testing_number": 20, "upsample_mode": "bilinear", "share_noise": True,
        "input_activations": False}))
    cfg = load_config(path)
    assert cfg.model.preset == "lsun_256" and cfg.classifier.ensemble == 10
    assert cfg.features.steps == (50, 150, 250, 350) and cfg.features.blocks == (6, 7, 8, 9)
    assert not [r for r in caplog.records if "ignoring keys" in r.getMessage()]
    _write_json(path, dim=[256, 256, 8448])
    with pytest.raises(ConfigError, match="give 8192"):
        load_config(path)


@pytest.mark.parametrize("dim, what", [([64, 64, 1000], "1344"), ([256, 256, 1344], "64x64")])
def test_dim_is_checked_against_the_backbone(ref, tmp_path, dim, what):
    path = _write_json(_copy_fixture_json(ref, tmp_path), dim=dim)
    with pytest.raises(ConfigError, match=what):
        load_config(path)


@pytest.mark.parametrize("change, what", [
    ({"blocks": [2, 20]}, "blocks: block 20 is out of range: this model's blocks are 0..11"),
    ({"steps": [50, 1000]}, "steps: step 1000 is out of range: this model's steps are 0..999"),
])
def test_steps_and_blocks_are_checked_against_the_backbone(ref, tmp_path, change, what):
    # spec.check_steps/check_blocks, as everywhere; a step past the schedule passed before.
    path = _write_json(_copy_fixture_json(ref, tmp_path), **change)
    with pytest.raises(ConfigError, match=what):
        load_config(path)


# -- importing ----------------------------------------------------------------------------------
def test_import_strips_the_prefix_and_keeps_every_tensor(ref, imported):
    raw = torch.load(ref / "pixel_classifiers" / "model_1.pth", weights_only=True)
    raw = raw["model_state_dict"]
    state = _states(imported)[1]
    assert set(raw) == {"module." + k for k in state}
    for k, v in state.items():
        assert v.dtype == raw["module." + k].dtype and torch.equal(v, raw["module." + k])
    ens = load_ensemble(imported, "cpu")
    assert ens.config.predict.vote == "hard" and len(ens) == 3
    assert ens.info.feature_dim == 1344 and ens.info.fingerprint["sha256"]


def test_member_without_prefix_reads_the_same(ref, tmp_path):
    raw = torch.load(ref / "pixel_classifiers" / "model_0.pth", weights_only=True)
    bare = {k[len("module."):]: v for k, v in raw["model_state_dict"].items()}
    torch.save({"model_state_dict": bare}, tmp_path / "model_0.pth")
    a = read_reference_member(ref / "pixel_classifiers" / "model_0.pth", 1344, 34)
    b = read_reference_member(tmp_path / "model_0.pth", 1344, 34)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_other_layouts_are_one_line_errors_naming_the_file(ref, tmp_path):
    torch.save({"model_state_dict": {"module.fc.weight": torch.zeros(3, 3)}},
               tmp_path / "model_0.pth")
    with pytest.raises(RunError, match="model_0.pth.*not a reference pixel_classifier") as err:
        read_reference_member(tmp_path / "model_0.pth", 1344, 34)
    assert "\n" not in str(err.value)
    with pytest.raises(RunError, match="model_0.pth: layers.0.weight"):
        read_reference_member(ref / "pixel_classifiers" / "model_0.pth", 1000, 34)
    (tmp_path / "model_1.pth").write_bytes(b"not a torch file")
    with pytest.raises(RunError, match="model_1.pth is not a readable torch file"):
        read_reference_member(tmp_path / "model_1.pth", 1344, 34)


def test_a_missing_member_writes_nothing(ref, tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(ref / "pixel_classifiers" / "model_0.pth", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="2 of 3 members missing"):
        import_run(tmp_path / "models", tmp_path / "run", load_config(ref / "ddpm.json"))
    assert not (tmp_path / "run").exists()


# -- the reference's predictions ------------------------------------------------------------------
@pytest.mark.slow
def test_imported_run_reproduces_the_reference_predictions(ref, imported, tmp_path, one_thread):
    """Float32 features of the fixture's test images, the imported run, hard vote: the
    reference's masks (>= 99.9% of pixels) and its mIoU 25.41 (within 0.1)."""
    cfg = load_config(ref / "ddpm.json").replace(features={"dtype": "float32"})
    store = ddpmseg.extract(cfg.data.test_dir, tmp_path / "test.zarr", cfg, device="cpu",
                            progress=False)
    assert store.info.dtype == "float32"
    summary = ddpmseg.predict(imported, store, tmp_path / "preds", device="cpu",
                              progress=False)
    assert summary["vote"] == "hard"
    same = total = 0
    for name in NAMES:
        expected = np.load(ref / "expected" / f"{name}.npy")
        got = np.load(tmp_path / "preds" / f"{name}.npy")
        same += int((got == expected).sum())
        total += expected.size
    assert same / total >= 0.999
    result = ddpmseg.evaluate(tmp_path / "preds", cfg.data.test_dir, num_classes=34,
                              ignore_label=255)
    assert abs(100 * result["miou"] - 25.41) <= 0.1
    # Straight from the images, with the backbone the run's fingerprint names: the same masks.
    ddpmseg.predict(imported, cfg.data.test_dir, tmp_path / "from_images", device="cpu",
                    progress=False)
    for name in NAMES:
        assert np.array_equal(np.load(tmp_path / "from_images" / f"{name}.npy"),
                              np.load(tmp_path / "preds" / f"{name}.npy"))


# -- exporting ------------------------------------------------------------------------------------
def test_round_trip_import_export_import_is_bit_identical(ref, imported, tmp_path):
    ddpm_json = export_run(imported, tmp_path / "out")
    raw = json.loads(ddpm_json.read_text())
    assert raw["model_num"] == 3 and raw["dim"] == [64, 64, 1344]
    assert raw["share_noise"] is True and raw["upsample_mode"] == "bilinear"
    # Where and how the reference's load_ensemble reads a member: exp_dir/<steps>_<blocks>/,
    # into nn.DataParallel(pixel_classifier), strictly.
    members = tmp_path / "out" / "pixel_classifiers" / "50_150_250_2_4_5_7_8"
    assert raw["exp_dir"] == str(members.parent.resolve())
    saved = torch.load(members / "model_2.pth", weights_only=True)
    assert list(saved) == ["model_state_dict"]
    torch.nn.DataParallel(PixelMLP(1344, 34, init=False)).load_state_dict(
        saved["model_state_dict"], strict=True)
    again = import_run(tmp_path / "out" / "pixel_classifiers", tmp_path / "run2",
                       load_config(ddpm_json))
    before, after = _states(imported), _states(again)
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert load_ensemble(again, "cpu").info.fingerprint == \
        load_ensemble(imported, "cpu").info.fingerprint


def test_export_of_an_etf_run_says_the_head_is_dropped(ref, imported, tmp_path):
    run = tmp_path / "etf_run"
    shutil.copytree(imported, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["classifier"]["etf"] = "shared"
    (run / "config.json").write_text(json.dumps(cfg))
    record_files(run, ["config.json"])  # an edit the run's manifest knows of
    result = CliRunner().invoke(cli, ["export-run", str(run), str(tmp_path / "out"),
                                      "--format", "reference"])
    assert result.exit_code == 0, result.output
    assert "ETF regulariser (shared) is dropped" in result.output
    assert (tmp_path / "out" / "pixel_classifiers" / "50_150_250_2_4_5_7_8" / "model_0.pth"
            ).is_file()
    again = CliRunner().invoke(cli, ["export-run", str(run), str(tmp_path / "out")])
    assert again.exit_code == 1 and "already holds" in again.output


def test_extract_takes_the_training_path_of_a_ddpm_json(ref, tmp_path, one_thread):
    store = tmp_path / "train.zarr"
    result = CliRunner().invoke(cli, ["extract", str(store), "--config", str(ref / "ddpm.json"),
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    names = sorted(p.stem for p in (ref / "data" / "train").glob("*.png"))
    info = ddpmseg.featcache.FeatureStore.open(store).info
    assert sorted(info.names) == names and info.feature_dim == 1344
    refused = CliRunner().invoke(cli, ["extract", str(tmp_path / "x.zarr")])
    assert refused.exit_code == 2 and "training folder" in refused.output


def test_export_then_import_of_the_export_folder_keeps_weights_and_class_names(
        ref, imported, tmp_path):
    run = tmp_path / "named"
    shutil.copytree(imported, run)
    names = [f"part {i}" for i in range(34)]
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["class_names"] = names
    (run / "config.json").write_text(json.dumps(cfg))
    store = json.loads((run / "store.json").read_text())
    store["info"]["class_names"] = names
    (run / "store.json").write_text(json.dumps(store))
    record_files(run, ["config.json", "store.json"])
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export-run", str(run), str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "ddpm.json").read_text())["class_names"] == names
    # The folder export wrote, with the ddpm.json it wrote, as the README says.
    res = CliRunner().invoke(cli, ["import-run", str(out), str(tmp_path / "back"),
                                   "--config", str(out / "ddpm.json")])
    assert res.exit_code == 0, res.output
    back = load_ensemble(tmp_path / "back", "cpu")
    assert back.info.class_names == tuple(names)
    assert back.config.data.class_names == tuple(names)
    before, after = _states(run), _states(tmp_path / "back")
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_import_over_a_run_leaves_only_the_imported_run(ref, imported, tmp_path):
    """import-run replaces a run through run.py (its one writer): the old run's extra members,
    its log and a killed writer's temporary file are gone; other files stay."""
    run = tmp_path / "run"
    shutil.copytree(imported, run)
    (run / "member_07.pt").write_bytes(b"an older, larger ensemble")
    (run / "train_log.jsonl").write_text("{}\n")
    (run / ".member_01.pt.4242.tmp").write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    import_run(ref / "pixel_classifiers", run, load_config(ref / "ddpm.json"), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [p.name for p in imported.iterdir()] + ["notes.txt"])
    for name in ("member_00.pt", "member_01.pt", "member_02.pt"):
        assert (run / name).read_bytes() == (imported / name).read_bytes()
