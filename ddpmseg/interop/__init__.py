"""Other tools' formats: the reference code's (ddpm-segmentation: its ddpm.json configs and its
trained classifiers, read and written), and labelling tools' (labels/: Label Studio, COCO,
CVAT/VOC masks in, pre-annotations out)."""
