"""Labelling tools in and out: ``import_labels`` turns a tool's export into ``<id>_mask.png``
files beside the images (what ``extract`` reads); ``export_labels`` turns a prediction folder
into pre-annotations for a person to correct.

The functions are in api (``from ddpmseg.interop.labels.api import import_labels``).
One module per format: label_studio (brush RLE), coco (polygons/RLE), voc (CVAT's
"Segmentation mask 1.1" and Pascal VOC); common holds what they share.
"""

# The formats each direction knows (this module imports nothing: the CLI reads them cheaply).
FORMATS = ("label-studio", "coco", "cvat", "voc")
EXPORT_FORMATS = ("label-studio", "coco")
