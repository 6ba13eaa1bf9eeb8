"""import_labels (a labelling tool's export -> masks beside the images) and export_labels (a
prediction folder -> pre-annotations)."""

from __future__ import annotations

from pathlib import Path

from ddpmseg.config import Config
from ddpmseg.core.errors import ConfigError
from ddpmseg.core.locking import writer_lock
from ddpmseg.interop.labels import coco, label_studio, voc
from ddpmseg.interop.labels import EXPORT_FORMATS, FORMATS
from ddpmseg.interop.labels.common import check_out, read_predictions, write_masks
from ddpmseg.interop.reference_config import load_config

_READERS = {"label-studio": label_studio.read, "coco": coco.read, "cvat": voc.read,
            "voc": voc.read}


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise ConfigError(f"unknown labels format {fmt!r}",
                          f"pass `fmt` as one of {', '.join(allowed)}")


def import_labels(src: str | Path, data_dir: str | Path, fmt: str,
                  config: Config | str | Path | None = None) -> list[Path]:
    """Write ``<id>_mask.png`` beside each annotated image of ``data_dir`` from the export
    ``src`` of a labelling tool (``fmt``: label-studio, coco, cvat or voc). Class names are
    mapped by name to ``config``'s classes (a Config, a config file or bundled name; None: the
    defaults). Everything is checked before the first mask is written. Returns the masks."""
    _check_format(fmt, FORMATS)
    cfg = config if isinstance(config, Config) else load_config(config)
    return write_masks(_READERS[fmt](src), data_dir, cfg, src)


def export_labels(pred: str | Path, out: str | Path, fmt: str,
                  url_prefix: str | None = None) -> list[Path]:
    """Pre-annotations from the prediction folder ``pred`` into the folder ``out``:
    label-studio: ``tasks.json`` (a ``predictions`` entry per image) and ``config.xml`` (the
    labelling config); coco: ``coco.json`` with RLE segmentations. ``url_prefix`` goes before
    each image's file name in the Label Studio tasks; None: Label Studio's local-files URL of
    the predicted images' folder (``/data/local-files/?d=`` and the folder's absolute path, for
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/). Returns the files written."""
    _check_format(fmt, EXPORT_FORMATS)
    folder = read_predictions(pred)
    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, "export folder"):
        if fmt == "coco":
            return coco.write(folder, out)
        if url_prefix is None:
            images = {item.image.parent for item in folder.items if item.image is not None}
            where = str(next(iter(images)).resolve()).lstrip("/") + "/" if len(images) == 1 else ""
            url_prefix = f"/data/local-files/?d={where}"
        return label_studio.write(folder, out, url_prefix)

