"""`ddpmseg evaluate` through click: the table, metrics.json, config classes, error lines."""

import json

import numpy as np
from click.testing import CliRunner

from ddpmseg.cli.main import cli


def write_case(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    # class 0: inter 1, union 2 -> 0.5; class 1: inter 1, union 2 -> 0.5; class 2: inter 1 -> 1.0
    np.save(pred / "x.npy", np.array([[0, 1], [1, 2]], np.uint8))
    np.save(gt / "x.npy", np.array([[0, 0], [1, 2]], np.uint8))
    (pred / "predict.json").write_text('{"names": ["x"]}')  # as a finished predict's lists it
    return pred, gt


def test_evaluate_prints_table_and_writes_metrics(tmp_path):
    pred, gt = write_case(tmp_path)
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "3",
                                   "--ignore-label", "255", "--confusion"])
    assert res.exit_code == 0, res.output
    assert "IoU %" in res.output and "class_1" in res.output
    assert "mIoU 66.67 %" in res.output
    metrics = json.loads((pred / "metrics.json").read_text())
    assert abs(metrics["miou"] - 2 / 3) < 1e-9
    assert (pred / "confusion.csv").is_file() and (pred / "confusion.png").is_file()


def test_evaluate_takes_classes_from_config(tmp_path):
    pred, gt = write_case(tmp_path)
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--config", "cat_15",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "background" in res.output  # cat_15's class names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 15 and len(metrics["classes"]) == 15
    assert abs(metrics["miou"] - 2 / 15) < 1e-9  # 0.5 + 0.5 + 1.0 over 15 classes


def test_evaluate_missing_paths_give_error_lines(tmp_path):
    pred, gt = write_case(tmp_path)
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "nope"), str(gt),
                                   "--num-classes", "3"])
    assert res.exit_code != 0
    assert "error:" in res.output and "nope" in res.output
    (gt / "x.npy").unlink()
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "3"])
    assert res.exit_code != 0
    assert "error:" in res.output and "x.npy" in res.output


def _predict_json(pred, num_classes=3, ignore_label=255, class_names=("a", "b", "c")):
    (pred / "predict.json").write_text(json.dumps({
        "names": ["x"], "num_classes": num_classes, "ignore_label": ignore_label,
        "class_names": list(class_names)}))


def test_evaluate_refuses_a_config_of_other_classes_and_keeps_metrics(tmp_path):
    pred, gt = write_case(tmp_path)
    _predict_json(pred)
    (pred / "metrics.json").write_text('{"miou": 0.25}')
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--config", "cat_15"])
    assert res.exit_code == 2, res.output
    errors = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "config cat_15 has 15 classes" in errors[0]
    assert str(pred / "predict.json") in errors[0] and "3 classes" in errors[0]
    assert (pred / "metrics.json").read_text() == '{"miou": 0.25}'
    # --num-classes against predict.json too; the same classes are scored as before.
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "4"])
    assert res.exit_code == 2 and "4 classes" in res.output and "3 classes" in res.output
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "3"])
    assert res.exit_code == 0, res.output
    assert "mIoU 66.67 %" in res.output


def test_evaluate_refuses_other_class_names(tmp_path):
    pred, gt = write_case(tmp_path)
    toml = tmp_path / "three.toml"
    toml.write_text('[data]\nname = "three"\nnum_classes = 3\nclass_names = ["a", "x", "c"]\n')
    _predict_json(pred)
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--config", str(toml)])
    assert res.exit_code == 2, res.output
    assert "class 1 is 'x' in config three, 'b' in" in res.output
    assert not (pred / "metrics.json").exists()


def test_evaluate_refuses_a_config_of_other_classes_than_a_store(tmp_path):
    from ddpmseg.spec import FeatureSpec
    from ddpmseg.featcache.store import FeatureStore, StoreInfo

    pred, _ = write_case(tmp_path)
    spec = FeatureSpec(steps=(5,), blocks=(1,), shapes=((2, 2, 2),), image_size=(2, 2))
    info = StoreInfo(spec, num_images=1, names=("x",), num_classes=3, ignore_label=255)
    store = FeatureStore.create(tmp_path / "gt.zarr", info)
    store.write_image(0, [np.zeros((2, 2, 2), np.float32)], np.array([[0, 0], [1, 2]], np.uint8))
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(tmp_path / "gt.zarr"),
                                   "--config", "cat_15"])
    assert res.exit_code == 2, res.output
    assert "config cat_15 has 15 classes" in res.output and "gt.zarr" in res.output
    assert not (pred / "metrics.json").exists()


def test_a_config_without_classes_takes_them_from_predict_json(tmp_path):
    pred, gt = write_case(tmp_path)
    _predict_json(pred)
    toml = tmp_path / "plain.toml"
    toml.write_text("[predict]\nvote = \"hard\"\n")
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert "mIoU 66.67 % over 3 classes" in res.output
