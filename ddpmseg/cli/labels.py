"""``ddpmseg labels import`` / ``labels export``: masks from labelling tools in, predictions out
to them."""

from __future__ import annotations

import click

from ddpmseg.cli.common import global_options
from ddpmseg.interop.labels import EXPORT_FORMATS, FORMATS  # names only: no numpy, no torch


@click.group("labels")
def command() -> None:
    """Masks from labelling tools in (import), predictions out as pre-annotations (export).

    \b
    Examples:
    ddpmseg labels export PRED OUT --format label-studio   predictions -> tasks.json, config.xml
    ddpmseg labels import SRC DATA_DIR --format label-studio   export -> <id>_mask.png files
    """


@command.command("import")
@click.argument("src", metavar="SRC", type=click.Path(exists=True))
@click.argument("data_dir", metavar="DATA_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="label-studio: its JSON export (brush RLE); coco: a COCO JSON (polygons or "
                   "RLE); cvat/voc: the unpacked \"Segmentation mask 1.1\" folder "
                   "(SegmentationClass/*.png, labelmap.txt; voc: VOC's classes without one).")
@click.option("--config", default=None, metavar="C",
              help="Config (a TOML file or a bundled name) whose class names the labels are.")
def import_command(src, data_dir, fmt, config):
    """Write <id>_mask.png beside each annotated image of DATA_DIR (class indices, the
    ignore label where unlabelled), ready for `extract`. Images are matched by file name;
    labels by class name. Everything is checked before the first mask is written.

    \b
    Example:
      ddpmseg labels import export.json data/train --format label-studio --config C
    """
    from ddpmseg.interop.labels.api import import_labels

    written = import_labels(src, data_dir, fmt, config)
    click.echo(f"wrote {len(written)} mask(s) into {data_dir}", err=True)


@command.command("export")
@click.argument("pred", metavar="PRED", type=click.Path(exists=True, file_okay=False))
@click.argument("out", metavar="OUT")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="label-studio",
              show_default=True,
              help="label-studio: OUT/tasks.json with pre-annotations and OUT/config.xml, the "
                   "labelling config; coco: OUT/coco.json with RLE segmentations.")
@click.option("--url-prefix", default=None, metavar="URL",
              help="Put before each image's file name in tasks.json. [default: Label Studio's "
                   "local-files URL of the predicted images' folder, for "
                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/]")
def export_command(pred, out, fmt, url_prefix):
    """Pre-annotations from the prediction folder PRED, for a person to correct: per image
    the predicted mask of each class, and a score (1 - the ensemble's mean normalised
    entropy when PRED has uncertainty maps, else 0) for Label Studio to sort by.

    \b
    Example:
      ddpmseg labels export preds/ labelstudio/ --format label-studio
    """
    from ddpmseg.interop.labels.api import export_labels

    for path in export_labels(pred, out, fmt, url_prefix=url_prefix):
        click.echo(str(path))


for _sub in (import_command, export_command):
    _sub.params.extend(global_options())
