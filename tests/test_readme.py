"""README's usage sections, run as written: the user's path from a data folder to results.

"Bring your own data" is the scenario a new user walks: a set the demo does not use (horse_21
from ../shared when present, else synthetic 256px images and masks made here, under the
README's folder names data/train and data/test), at 64 px with the bundled backbone, with
exactly the README's flags. The second block (a published checkpoint) runs with the bundled
backbone substituted for lsun_horse.pt, since no published checkpoint can be downloaded here;
SUBSTITUTIONS lists every change. A command or path the README shows that stops working
fails this file.
"""

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import cli
from ddpmseg.featcache.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BYOD = "## Bring your own data"
# Sections whose commands other tests run as written.
ELSEWHERE = {"## Coming from ddpm-segmentation": "tests/cli/test_readme_reference.py",
             "## The labelling loop": "tests/test_readme.py",
             "## Feature stores on S3 and other object stores":
                 "tests/featcache/test_object_store.py"}
# Published-checkpoint lines, run here with the bundled backbone instead (said in the output).
SUBSTITUTIONS = [
    ("--checkpoint lsun_horse.pt", "--checkpoint bundled:faces_64 --resize"),
    ("check-checkpoint lsun_horse.pt --preset lsun_256",
     "check-checkpoint bundled:faces_64 --preset faces_64"),
    # horse_21.toml trains 10 members for up to 100 epochs: one short member stands in.
    ("ddpmseg fit train.zarr runs/horse --config configs/horse_21.toml",
     "ddpmseg fit train.zarr runs/horse --config configs/horse_21.toml --ensemble 1 "
     "--max-epochs 1"),
    ("ddpmseg evaluate preds/ data/test --config configs/horse_21.toml",
     "ddpmseg evaluate preds/ data/test --config configs/horse_21.toml --resize"),
    ("ddpmseg report preds/ --gt data/test", "ddpmseg report preds/ --gt data/test --resize"),
]


def section(title: str) -> str:
    return (REPO / "README.md").read_text().split(title, 1)[1].split("\n## ", 1)[0]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """The ddpmseg command lines of a bash block (continuation lines joined)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip().startswith("ddpmseg ")]


def run(command: str) -> str:
    argv = shlex.split(command)
    assert argv[0] == "ddpmseg", command
    result = CliRunner().invoke(cli, argv[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.stdout


# For tests of README sections run elsewhere (ELSEWHERE): the section, its bash blocks, their
# ddpmseg lines, and running one line as written.
README_SECTION_RUNNERS = (section, bash_blocks, commands, run)


def make_data(root: Path, n_train: int = 2, n_test: int = 2) -> None:
    """data/train and data/test: horse_21 pairs (256px) when ../shared has them, else made up."""
    real = SHARED / "data" / "horse_21" / "real"
    for split, n in (("train", n_train), ("test", n_test)):
        dst = root / "data" / split
        dst.mkdir(parents=True)
        if real.is_dir():
            for png in sorted((real / split).glob("*.png"))[:n]:
                shutil.copy(png, dst)
                shutil.copy(png.with_suffix(".npy"), dst)
            continue
        rng = np.random.default_rng(len(split))
        for i in range(n):
            img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            mask = np.zeros((256, 256), dtype=np.uint8)
            for c in range(1, 6):  # blocks of five classes, with colours to go with them
                y, x = rng.integers(0, 192, 2)
                mask[y:y + 64, x:x + 64] = c
                img[y:y + 64, x:x + 64] = img[y:y + 64, x:x + 64] // 4 + 40 * c
            # Names differ per split, as in a real data set: a test image moved into
            # data/train must add an image, not replace one of the same name.
            Image.fromarray(img).save(dst / f"{split}{i}.png")
            np.save(dst / f"{split}{i}.npy", mask)


@pytest.fixture
def readme_dir(tmp_path, monkeypatch, one_thread):
    """A user's working directory: their data, and the repository's configs/ beside it."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_readme_command_is_run_by_a_test():
    text = (REPO / "README.md").read_text()
    for title in re.findall(r"^## .*$", text, flags=re.M):
        found = [c for block in bash_blocks(section(title)) for c in commands(block)]
        if not found or title == BYOD:
            continue
        if title in ELSEWHERE:
            assert (REPO / ELSEWHERE[title]).is_file()
            continue
        # Quickstart (`ddpmseg demo`, inside the install line) runs in CI through .ci/run's
        # sibling, the demo-command marker; the diffusers worked example needs a real model
        # folder (tests/test_diffusers.py runs the same commands on a tiny one).
        assert title in ("## Quickstart", "## Other backbones: diffusers' DDPM UNets and "
                                          "Stable Diffusion"), f"{title}: {found} run by no test"


def test_documented_configs_exist():
    for path in set(re.findall(r"configs/[\w.]+\.toml", (REPO / "README.md").read_text())):
        assert (REPO / path).is_file(), path


@pytest.mark.slow
def test_bring_your_own_data_with_the_bundled_backbone(readme_dir):
    """The scenario: extract train and test, fit, predict from the store and from the image
    folder (identical masks), evaluate against the original 256px masks, open in xarray."""
    block = bash_blocks(section(BYOD))[0]
    out = {}
    for command in commands(block):
        assert "lsun" not in command  # this block needs no download
        out[command] = run(command)
    assert len(out) == 9
    names = sorted(p.stem for p in Path("data/test").glob("*.png"))
    for name in names:
        from_store = np.load(Path("preds") / f"{name}.npy")
        from_images = np.load(Path("preds-from-images") / f"{name}.npy")
        assert from_store.shape == np.load(Path("data/test") / f"{name}.npy").shape  # 256px
        np.testing.assert_array_equal(from_store, from_images)
        assert np.load(Path("preds-64") / f"{name}.npy").shape == (64, 64)
        assert (Path("preds") / f"{name}_uncertainty.png").is_file()
    # evaluate: the original masks as they are, the predictions being at the images' size.
    evaluated = [v for k, v in out.items() if k.startswith("ddpmseg evaluate preds/ data/test")]
    assert re.search(r"mIoU \d+\.\d+ % over 21 classes, 2 images", evaluated[0])
    assert Path("preds/report/index.html").is_file()

    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr("train.zarr", consolidated=False)
    assert ds["labels"].dims == ("image", "y_64", "x_64")
    assert ds["act_t50_b8"].dims == ("image", "channel_64", "y_64", "x_64")
    assert ds["act_t50_b2"].dims == ("image", "channel_128", "y_16", "x_16")
    assert ds.sizes["image"] == 2


@pytest.mark.slow
def test_non_square_photos_as_written(readme_dir):
    """The non-square block: 3:2 crops of the data (360x240), padded to the bundled model's
    64 px, one short member; predictions at 360x240 scored against the 360x240 masks."""
    block = bash_blocks(section(BYOD))[2]
    block = block.replace("--ensemble 3 --max-epochs 6", "--ensemble 1 --max-epochs 1")
    for split in ("train", "test"):
        dst = Path("photos") / split
        dst.mkdir(parents=True)
        for png in sorted(Path("data", split).glob("*.png")):
            with Image.open(png) as im:
                wide = im.convert("RGB").crop((0, 43, 256, 213)).resize((360, 240))
            wide.save(dst / png.name)
            mask = Image.fromarray(np.load(png.with_suffix(".npy"))).crop((0, 43, 256, 213))
            np.save(dst / f"{png.stem}.npy", np.asarray(mask.resize((360, 240), Image.NEAREST)))
    out = [run(command) for command in commands(block)]
    assert len(out) == 4 and re.search(r"mIoU \d+\.\d+ % over 21 classes, 2 images", out[3])
    for png in Path("photos/test").glob("*.png"):
        assert np.load(Path("preds-wide") / f"{png.stem}.npy").shape == (240, 360)
        with Image.open(Path("preds-wide") / f"{png.stem}_uncertainty.png") as im:
            assert im.size[0] > im.size[1]  # the two heat maps side by side, each 3:2


def substituted(text: str, substitutions, name: str, capsys, note: str) -> str:
    """``text`` with each (README spelling, stand-in) replaced; every spelling must still be in
    the README, and the test says on the terminal what it stood in for."""
    for old, new in substitutions:
        assert old in text, f"README no longer has {old!r}: update {name}"
        text = text.replace(old, new)
    with capsys.disabled():
        print(f"\n[test_readme] {note}")
    return text


@pytest.mark.slow
def test_bring_your_own_data_with_a_published_checkpoint(readme_dir, capsys):
    block = bash_blocks(section(BYOD))[1]
    assert "--checkpoint lsun_horse.pt" in block
    block = substituted(block, SUBSTITUTIONS, "SUBSTITUTIONS", capsys,
                        "published-checkpoint block run with the bundled faces_64 backbone "
                        "substituted for lsun_horse.pt (no download here)")
    out = [run(command) for command in commands(block)]
    assert len(out) == 7
    assert "loads strictly as faces_64" in out[0]
    assert re.search(r"mIoU \d+\.\d+ % over 21 classes", out[5])


LOOP = "## The labelling loop"
# The loop's published-checkpoint lines, run with the bundled backbone; its fits train two short
# members (suggest needs two to disagree), and the sweep of ffhq_34 stores runs on this test's
# own train and test stores with a small sample.
LOOP_SUBSTITUTIONS = [
    ("--checkpoint lsun_horse.pt", "--checkpoint bundled:faces_64 --resize"),
    ("--config configs/horse_21.toml\n", "--config configs/horse_21.toml --ensemble 2 "
                                         "--max-epochs 1\n"),
    ("--diverse --out suggest/", "--diverse --out suggest/ --resize"),
    ("ddpmseg sweep ffhq34_train.zarr ffhq34_test.zarr", "ddpmseg sweep train.zarr test.zarr"),
    ("--pixels 30000 --test-pixels 81920 --seeds 3 --epochs 6",
     "--pixels 2000 --test-pixels 2000 --seeds 1 --epochs 1"),
]


@pytest.mark.slow
def test_labelling_loop_commands(readme_dir, capsys):
    """The loop as written (bundled backbone substituted): extract, fit, suggest on unlabelled
    images, label one more image, extract again (the store grows), fit again; then the sweep."""
    loop, sweep = bash_blocks(section(LOOP))[:2]
    text = loop + " ".join(sweep.replace("\\\n", " ").split()) + "\n"
    text = substituted(text, LOOP_SUBSTITUTIONS, "LOOP_SUBSTITUTIONS", capsys,
                       "labelling-loop block run with the bundled faces_64 backbone "
                       "substituted for lsun_horse.pt")
    unlabelled = Path("data/unlabelled")
    unlabelled.mkdir()
    for png in sorted(Path("data/test").glob("*.png")):
        shutil.copy(png, unlabelled)
    first, rest = text.split("# label the suggested images", 1)
    for command in commands(first):
        run(command)
    assert Path("suggest/suggest.csv").is_file() and Path("suggest/suggest.png").is_file()
    # "label the suggested images, move them (with their masks) into data/train"
    png = sorted(Path("data/test").glob("*.png"))[0]
    shutil.copy(png, "data/train")
    shutil.copy(png.with_suffix(".npy"), "data/train")
    loop_rest, sweep_cmds = rest.split("ddpmseg sweep", 1)
    for command in commands(loop_rest):
        run(command)
    from ddpmseg.featcache import FeatureStore

    assert len(FeatureStore.open("train.zarr")) == 3  # grown, not re-extracted
    run("ddpmseg extract data/test test.zarr --config configs/horse_21.toml "
        "--checkpoint bundled:faces_64 --resize")
    (command,) = commands("ddpmseg sweep" + sweep_cmds)
    out = run(command)
    assert "steps" in out and Path("sweep/sweep.csv").is_file()


PYTHON_API = "## Python API"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_python_api_runs_as_written(readme_dir, capsys):
    """The Python API section's block, as written, on the data of "Bring your own data": the
    bundled backbone with a config made for the 256 px models (was a CheckpointError)."""
    (block,) = python_blocks(section(PYTHON_API))
    assert "lsun" not in block  # it needs no download
    exec(compile(block, "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^mIoU \d+\.\d+%$", out, flags=re.M), out
    assert out.rstrip().endswith(str(Path("preds") / "report" / "index.html"))
    info = FeatureStore.open("train.zarr").info
    assert info.blocks == (2, 4, 5, 7, 8) and info.image_size == (64, 64)
    assert (Path("runs/horse") / "member_02.pt").is_file()  # ensemble=3 as replaced
