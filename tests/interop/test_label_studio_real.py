"""The labelling loop through a real Label Studio (issue 23): predictions exported as
pre-annotations, a labeller's corrected mask submitted through its API, the project exported,
``labels import`` gives that mask bit for bit, then ``extract`` grows the store and ``fit``
trains on it.

Label Studio lives in a venv of its own (about 1 GB; its dependencies never touch ours):
``python3 -m venv /work/lsvenv && /work/lsvenv/bin/pip install label-studio``, found through
``DDPMSEG_LABEL_STUDIO=/work/lsvenv/bin/label-studio`` (.ci/run makes both). Without it the test
skips, saying so, except under CI=true, where it fails. Its first start runs migrations (about
a minute or two). With ``DDPMSEG_SCREENSHOT_DIR`` set, the task page's screenshot is kept there.
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import cli
from ddpmseg.interop.labels.label_studio import mask_to_rle

from tests.helpers import chromium, need
from tests.interop.label_studio_server import ENV_VAR, PASSWORD, USER, LabelStudio

DEMO = Path(__file__).resolve().parents[2] / "ddpmseg" / "assets" / "demo"
CONFIG = "faces64_ffhq_34"  # the bundled faces config: the bundled backbone, 64 px


def run(*argv) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code == 0, f"ddpmseg {' '.join(map(str, argv))}\n{result.output}"
    return result.stdout


@pytest.fixture
def label_studio(tmp_path):
    executable = os.environ.get(ENV_VAR)
    if not executable or not os.access(executable, os.X_OK):
        need(f"{ENV_VAR} names no label-studio executable ({executable!r}); install it in a "
             f"venv of its own: python3 -m venv /work/lsvenv && /work/lsvenv/bin/pip install "
             f"label-studio, then {ENV_VAR}=/work/lsvenv/bin/label-studio")
    server = LabelStudio(executable, tmp_path, files_root=tmp_path / "data")
    try:
        yield server
    finally:
        server.stop()


def loop_data(root: Path) -> None:
    """data/train: two labelled demo faces; data/unlabelled: one face without its mask."""
    train, pool = root / "data" / "train", root / "data" / "unlabelled"
    train.mkdir(parents=True)
    pool.mkdir()
    for png in sorted((DEMO / "train").glob("*.png"))[:2]:
        shutil.copy(png, train)
        shutil.copy(png.with_suffix(".npy"), train)
    shutil.copy(sorted((DEMO / "test").glob("*.png"))[0], pool)


def corrected_result(labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[dict]]:
    """What a labeller submits: the prediction with a block repainted, as brush regions."""
    corrected = labels.copy()
    corrected[8:24, 8:40] = names.index("head")
    h, w = corrected.shape
    result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels",
               "original_width": w, "original_height": h, "image_rotation": 0,
               "value": {"format": "rle", "rle": mask_to_rle(corrected == c),
                         "brushlabels": [names[c]]}}
              for c in np.unique(corrected).tolist()]
    return corrected, result


def snapshot_export(ls: LabelStudio, project: int) -> list:
    """A snapshot export, with predictions whole (a simple export gives their ids only)."""
    options = {"predictions": {"only_id": False}, "annotations__completed_by": {"only_id": True}}
    snap = ls.api("POST", f"/api/projects/{project}/exports",
                  {"title": "ddpmseg", "serialization_options": options})
    deadline = time.monotonic() + 300
    while ls.api("GET", f"/api/projects/{project}/exports/{snap['id']}")["status"] != "completed":
        assert time.monotonic() < deadline, "the snapshot export did not complete"
        time.sleep(1)
    raw = ls.api("GET", f"/api/projects/{project}/exports/{snap['id']}/download?exportType=JSON",
                 raw=True)
    return json.loads(raw)


# Slow (Label Studio starts, ~2-3 min): mark it @pytest.mark.slow once that marker is registered.
def test_label_studio_round_trip(tmp_path, label_studio, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    loop_data(tmp_path)
    run("extract", "data/train", "train.zarr", "--config", CONFIG)
    run("fit", "train.zarr", "runs/one", "--config", CONFIG, "--ensemble", "2", "--max-epochs", 1)
    run("predict", "runs/one", "data/unlabelled", "preds", "--uncertainty")
    run("labels", "export", "preds", "ls", "--format", "label-studio",
        "--url-prefix", "/data/local-files/?d=unlabelled/")
    ls = label_studio
    project = ls.api("POST", "/api/projects", {"title": "ddpmseg pre-annotations",
                                               "label_config": Path("ls/config.xml").read_text()})
    ls.api("POST", "/api/storages/localfiles", {"project": project["id"], "title": "images",
                                                "path": str(tmp_path / "data" / "unlabelled"),
                                                "use_blob_urls": True})
    imported = ls.api("POST", f"/api/projects/{project['id']}/import",
                      json.loads(Path("ls/tasks.json").read_text()))
    assert imported["task_count"] == 1 and imported["prediction_count"] == 1
    (task,) = ls.api("GET", f"/api/tasks?project={project['id']}")["tasks"]
    screenshot(ls, project["id"], task["id"], tmp_path / "label-studio-task.png")

    name = json.loads(Path("preds/predict.json").read_text())["names"][0]
    names = json.loads(Path("preds/predict.json").read_text())["class_names"]
    corrected, result = corrected_result(np.load(f"preds/{name}.npy"), names)
    ls.api("POST", f"/api/tasks/{task['id']}/annotations",
           {"result": result, "was_cancelled": False, "ground_truth": False})
    exported = snapshot_export(ls, project["id"])
    assert isinstance(exported[0]["predictions"][0], dict)  # whole, not an id
    Path("export.json").write_text(json.dumps(exported))

    run("labels", "import", "export.json", "data/unlabelled", "--format", "label-studio",
        "--config", CONFIG)
    mask = np.asarray(Image.open(f"data/unlabelled/{name}_mask.png"))
    assert mask.dtype == np.uint8 and np.array_equal(mask, corrected)

    # the labelled image joins the training set: the store grows, the next fit trains on it
    for path in Path("data/unlabelled").glob(f"{name}*"):
        shutil.move(path, "data/train")
    from ddpmseg.featcache import FeatureStore

    run("extract", "data/train", "train.zarr", "--config", CONFIG)
    assert len(FeatureStore.open("train.zarr")) == 3
    run("fit", "train.zarr", "runs/two", "--config", CONFIG, "--ensemble", "2", "--max-epochs", 1)
    assert name in Path("runs/two/store.json").read_text()


def screenshot(ls: LabelStudio, project: int, task: int, path: Path) -> None:
    """The task page in headless chromium, showing the pre-annotation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(1280, 800)
    try:
        driver.set_page_load_timeout(180)
        driver.get(f"{ls.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys(USER)
        driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 120).until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{ls.url}/projects/{project}/data?task={task}")
        # The task opens with the prediction copied into the labeller's draft: its regions
        # listed by class, the brush masks drawn over the image.
        WebDriverWait(driver, 180).until(
            lambda d: d.find_elements(By.XPATH, "//*[text()='background']"))
        time.sleep(2)  # the canvas draws the brush masks after the region list
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
    assert Image.open(path).size[0] > 0
    keep = os.environ.get("DDPMSEG_SCREENSHOT_DIR")
    if keep:
        shutil.copy(path, Path(keep) / path.name)
