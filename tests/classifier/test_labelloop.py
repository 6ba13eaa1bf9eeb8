"""`suggest` ranks images by ensemble disagreement (and skips near-duplicates with diverse);
`sweep` finds the maps that carry the classes."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.classifier import fit
from ddpmseg.cli.main import cli
from ddpmseg.core.errors import ConfigError
from ddpmseg.featcache import content
from ddpmseg.pipelines.predict import load_run, predict
from ddpmseg.outputs.report import report
from ddpmseg.outputs.suggestions import read_suggestions
from ddpmseg.pipelines.suggest import diverse_order, suggest
from ddpmseg.pipelines.sweep import SweepSettings, _train_score, sweep


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, store_path, small_config):
    out = tmp_path_factory.mktemp("runs") / "run"
    return fit(store_path, out, small_config(ensemble=3, max_epochs=1), device="cpu",
               progress=False)


def test_suggest_ranks_by_mean_jsd_and_writes_csv_and_sheet(run_dir, store_path, tmp_path):
    pred = predict(run_dir, store_path, tmp_path / "pred", uncertainty=True, device="cpu",
                   progress=False)
    ranked = suggest(run_dir, store_path, tmp_path / "pred", device="cpu",
                     include_labelled=True)
    means = {n: float(np.load(pred["outputs"][n]["jsd"]).mean()) for n in pred["names"]}
    assert [s.name for s in ranked] == sorted(means, key=lambda n: -means[n])
    for s in ranked:
        assert s.score == pytest.approx(means[s.name], rel=1e-5)
        assert s.area.sum() == pytest.approx(1.0)
    with open(tmp_path / "pred" / "suggest.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["rank", "name", "score_jsd"] and rows[0][3] == "area:c0"
    assert [r[1] for r in rows[1:]] == [s.name for s in ranked]
    # The sheet: the top images' predictions, as predict made them (suggest keeps no label
    # map while ranking and predicts its rows again).
    from ddpmseg.outputs import render
    from ddpmseg.pipelines.suggest import SHEET_IMAGES, _class_names

    model = load_run(run_dir, "cpu")
    rows = [(f"{k}. {s.name}  (jsd {s.score:.4f})", None, np.load(pred["outputs"][s.name]["npy"]))
            for k, s in enumerate(ranked[:SHEET_IMAGES], 1)]
    want = render.contact_sheet(rows, render.make_palette(model.num_classes,
                                                          model.info.ignore_label),
                                _class_names(model), model.num_classes)
    with Image.open(tmp_path / "pred" / "suggest.png") as im:
        assert im.width > 300 and im.height > 300
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(want))
    # The HTML report lists the suggestions under "label these next", in their order.
    page = report(tmp_path / "pred").read_text()
    assert "Ranked by <code>ddpmseg suggest</code>" in page
    next_section = page[page.index('id="next"'):]
    found = [next_section.index(f">{s.name}<") for s in ranked[:3]]
    assert found == sorted(found)
    assert read_suggestions(tmp_path / "pred")[0][0] == ranked[0].name


def test_suggest_top_entropy_and_cli(run_dir, store_path, tmp_path):
    before = torch.get_num_threads()
    top = suggest(run_dir, store_path, tmp_path / "s", top=2, by="entropy", device="cpu",
                  include_labelled=True, threads=1 if before != 1 else 2)
    assert len(top) == 2 and top[0].score >= top[1].score
    assert torch.get_num_threads() == before  # threads= for the call only
    with pytest.raises(ConfigError, match="unknown score"):
        suggest(run_dir, store_path, tmp_path / "s", by="margin")
    result = CliRunner().invoke(cli, ["suggest", str(run_dir), str(store_path), "--out",
                                      str(tmp_path / "c"), "--top", "3", "--device", "cpu",
                                      "--include-labelled"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()] == ["1", "2", "3"]


def test_suggest_holds_its_out_folder_lock(run_dir, store_path, tmp_path, hold_lock):
    out = tmp_path / "next"
    pid = hold_lock(out, "suggestions folder")
    result = CliRunner().invoke(cli, ["suggest", str(run_dir), str(store_path), "--out",
                                      str(out), "--device", "cpu", "--include-labelled"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: suggestions folder {out} is being written by "
                                    f"process {pid} ")
    assert not any(out.iterdir())
    hold_lock.release()
    assert len(suggest(run_dir, store_path, out, device="cpu", include_labelled=True)) > 0
    assert (out / "suggest.csv").is_file()


def test_suggest_leaves_out_labelled_images_and_says_how_many(make_store, small_config,
                                                              tmp_path):
    """Images with a mask, or whose bytes the run was trained on, are not suggested again."""
    def record(store, hashes):
        content.write_state(store, store.info, content.ImageState(hashes))

    train, pool = tmp_path / "train.zarr", tmp_path / "pool.zarr"
    train_store = make_store(train, n_images=3)
    record(train_store, {f"img{i:03d}": [str(i) * 64, "m" * 64] for i in range(3)})
    run = fit(train, tmp_path / "run", small_config(ensemble=2, max_epochs=1), device="cpu",
              progress=False)
    pool_store = make_store(pool, n_images=4, labels=False, seed=1)
    # img002 of the pool is the run's training image "2" (the same bytes), img000 is new
    record(pool_store, {"img000": ["9" * 64, None], "img002": ["2" * 64, None]})
    ranked = suggest(run, pool, tmp_path / "s", device="cpu")
    assert ranked.skipped == {"img002": "trained on by the run"}
    assert sorted(s.name for s in ranked) == ["img000", "img001", "img003"]
    with open(tmp_path / "s" / "suggest.csv", newline="") as fh:
        assert [r[1] for r in list(csv.reader(fh))[1:]] == [s.name for s in ranked]
    everything = suggest(run, pool, tmp_path / "all", device="cpu", include_labelled=True)
    assert everything.skipped == {} and len(everything) == 4
    # the CLI: the ranking on stdout, how many were left out on stderr
    result = CliRunner().invoke(cli, ["suggest", str(run), str(pool), "--out",
                                      str(tmp_path / "c"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[1] for line in result.stdout.strip().splitlines()] == \
        [s.name for s in ranked]
    assert ("skipped 1 labelled image(s) (1 trained on by the run); --include-labelled ranks "
            "them too") in result.stderr.splitlines()
    # A store extracted with masks is all labelled: nothing is ranked, and stale suggestions
    # of an earlier ranking in that folder are replaced by an empty list.
    none = suggest(run, train, tmp_path / "s", device="cpu")
    assert list(none) == [] and none.skipped == {f"img{i:03d}": "with a mask" for i in range(3)}
    assert read_suggestions(tmp_path / "s") == []
    assert not (tmp_path / "s" / "suggest.png").exists()
    result = CliRunner().invoke(cli, ["suggest", str(run), str(train), "--out",
                                      str(tmp_path / "c"), "--device", "cpu"])
    assert result.exit_code == 0 and result.stdout == ""
    assert ("skipped 3 labelled image(s) (3 with a mask); --include-labelled ranks them too"
            in result.stderr.splitlines())
    result = CliRunner().invoke(cli, ["suggest", str(run), str(train), "--out",
                                      str(tmp_path / "c"), "--device", "cpu",
                                      "--include-labelled"])
    assert len(result.stdout.splitlines()) == 3
    assert "skipped 0 labelled images" in result.stderr.splitlines()


def test_diverse_order_skips_near_duplicates():
    scores = np.array([1.0, 0.95, 0.5, 0.1])
    pooled = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, -1.0]])
    order, sims = diverse_order(scores, pooled)
    assert order[:2] == [0, 2]        # image 1 duplicates image 0: it falls back
    assert sims[0] is None and sims[order.index(1)] > 0.99
    plain = sorted(range(4), key=lambda i: -scores[i])
    assert plain[:2] == [0, 1]


@pytest.mark.slow
def test_sweep_finds_the_map_that_carries_the_classes(make_store, tmp_path):
    train = make_store(tmp_path / "train.zarr", n_images=4, seed=0)
    test = make_store(tmp_path / "test.zarr", n_images=2, seed=1)
    settings = SweepSettings(pixels=1000, test_pixels=1000, seeds=2, epochs=20, candidates=2,
                             max_maps=2, batch_size=128)
    torch.manual_seed(1234)
    np.random.seed(1234)
    before, before_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    threads = torch.get_num_threads()
    summary = sweep(train, test, tmp_path / "sw", settings, compare=[((10, 20), (5,))],
                    threads=1)
    # The caller's random state and thread count are left as they were.
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert torch.get_num_threads() == threads
    # The same seed gives the same score, whatever the caller's random state.
    x, y = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2
    scores = []
    for outer in (5, 6):
        torch.manual_seed(outer)
        scores.append(_train_score(x, y, x, y, 2, 255, seed=3, s=settings))
    assert scores[0] == scores[1]
    singles = summary["singles"]
    # Blocks 8 hold 3 x one-hot(class); blocks 5 are noise.
    for t in (10, 20):
        assert np.mean(singles[f"t{t}_b8"]["mious"]) > 0.8
        assert np.mean(singles[f"t{t}_b5"]["mious"]) < 0.6
    assert summary["config"]["blocks"] == [8]
    noise = summary["compared"]["steps 10,20 blocks 5"]
    assert summary["compared"]["sweep's choice"]["miou"] > noise["miou"] + 0.2
    with open(tmp_path / "sw" / "sweep.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step \\ block", "5", "8"] and [r[0] for r in rows[1:]] == ["10", "20"]
    with Image.open(tmp_path / "sw" / "sweep.png") as im:
        assert im.width >= 150
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["config"]["blocks"] == [8]


def test_readers_of_a_store_refuse_while_a_writer_holds_it(run_dir, store_path, tmp_path,
                                                           hold_lock):
    """predict, suggest, evaluate (a store as ground truth) and sweep read a store under a
    shared lock: while an extract writes it (an --overwrite or --compact swaps in a store whose
    image numbers mean other images) they refuse in one line and write nothing."""
    pred = predict(run_dir, store_path, tmp_path / "pred", device="cpu", progress=False)
    pid = hold_lock(store_path, "store")
    want = f"error: store {store_path} is being written by process {pid} "
    commands = {
        "predict": ["predict", run_dir, store_path, tmp_path / "p2", "--device", "cpu"],
        "suggest": ["suggest", run_dir, store_path, "--out", tmp_path / "s", "--device", "cpu",
                    "--include-labelled"],
        "evaluate": ["evaluate", tmp_path / "pred", store_path, "--out", tmp_path / "m"],
        "sweep": ["sweep", store_path, store_path, "--out", tmp_path / "sw"],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, (name, result.output)
        lines = result.output.splitlines()
        assert len(lines) == 1 and lines[0].startswith(want), (name, result.output)
    for out in ("p2", "s", "m", "sw"):
        assert not (tmp_path / out).exists() or not any((tmp_path / out).iterdir()), out
    hold_lock.release()
    again = predict(run_dir, store_path, tmp_path / "p2", device="cpu", progress=False)
    assert again["num_images"] == pred["num_images"]


# A command run in a fresh interpreter, through the CLI's entry point; the last line printed
# says whether torch was imported by the time it ended.
_RUN_CLI = ("import sys\n"
            "from ddpmseg.cli.main import cli\n"
            "try:\n"
            "    cli.main(sys.argv[1:], prog_name='ddpmseg', standalone_mode=False)\n"
            "finally:\n"
            "    print('torch imported:', 'torch' in sys.modules)\n")


def _torch_imported(*args) -> bool:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RUN_CLI, "--no-progress",
                           *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "torch imported: True"


@pytest.mark.parametrize("command", ["evaluate", "evaluate-store", "report", "verify-store"])
def test_evaluate_report_and_verify_run_without_torch(run_dir, store_path, tmp_path, command):
    """`evaluate`, `report` and `verify` never run a model: they work without importing torch
    (3-4 s of start-up), on a real prediction folder and store. (evaluate against a store and
    verify need featcache/store.py torch-free at import; verifying a run's members reads their
    weights with torch.load, so only that imports torch.)"""
    pred = tmp_path / "pred"
    names = predict(run_dir, store_path, pred, uncertainty=True, device="cpu",
                    progress=False)["names"]
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in names:
        np.save(masks / f"{name}.npy", np.load(pred / f"{name}.npy"))
    args = {"evaluate": ["evaluate", pred, masks, "--confusion"],
            "evaluate-store": ["evaluate", pred, store_path],
            "report": ["report", pred, "--gt", masks],
            "verify-store": ["verify", store_path]}[command]
    assert not _torch_imported(*args)
    if command == "evaluate":
        assert json.loads((pred / "metrics.json").read_text())["miou"] == 1.0
    if command == "report":
        assert (pred / "report" / "index.html").is_file()
