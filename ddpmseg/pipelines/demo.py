"""``ddpmseg demo``: the whole pipeline on the face images and backbone bundled in the package."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ddpmseg.backbone.bundled import DEMO_DATA
from ddpmseg.classifier import fit
from ddpmseg.config import Config, load_toml
from ddpmseg.outputs.evaluate import evaluate
from ddpmseg.pipelines.extract import extract
from ddpmseg.pipelines.predict import predict
from ddpmseg.outputs.report import report

log = logging.getLogger(__name__)


def demo(out_dir: str | Path = "ddpmseg-demo", *, config: Config | None = None,
         device: str = "auto", progress: bool = True) -> dict:
    """extract -> fit -> predict -> evaluate -> report on the bundled demo set; returns
    evaluate's result (``evaluate.format_table`` prints it), with the path of the report's
    index.html under "report".

    Rerunning resumes: complete stores and finished members are reused.
    """
    cfg = config or load_toml("faces64_ffhq_34")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_json(out / "config.json")
    started = time.perf_counter()
    steps = [
        ("extract train", lambda: extract(DEMO_DATA / "train", out / "train.zarr", cfg,
                                          device=device, progress=progress)),
        ("extract test", lambda: extract(DEMO_DATA / "test", out / "test.zarr", cfg,
                                         device=device, progress=progress)),
        ("fit", lambda: fit(out / "train.zarr", out / "run", cfg, device=device,
                            progress=progress)),
        ("predict", lambda: predict(out / "run", out / "test.zarr", out / "pred",
                                    images=DEMO_DATA / "test", uncertainty=True,
                                    device=device, progress=progress)),
    ]
    for name, step in steps:
        log.info("== %s", name)
        step()
    result = evaluate(out / "pred", DEMO_DATA / "test", num_classes=cfg.data.num_classes,
                      ignore_label=cfg.data.ignore_label, class_names=cfg.data.class_names)
    result["report"] = report(out / "pred", DEMO_DATA / "test")
    log.info("demo finished in %.0f s; overlays and summary.png in %s, report in %s",
             time.perf_counter() - started, out / "pred", result["report"])
    return result
