"""Segment your own images with the small face backbone that ships with ddpmseg.

Paste it into a notebook, or run ``python examples/own_data.py``. Put your images in
TRAIN and TEST, each with a mask of the same stem (``<id>.npy`` of class indices, or a grey or
palette ``<id>_mask.png``; 255 marks unlabelled pixels), and set NUM_CLASSES. Images of any
size are resized to the model's 64x64 (masks with nearest neighbour). Nothing is downloaded.

The settings are a first look (2 members, a few epochs: minutes on a CPU); leave out the
``classifier`` line for the reference's 10 members and up to 100 epochs. Rerunning resumes:
extraction keeps the images it has, fit the members it finished.
"""

from pathlib import Path

import ddpmseg

TRAIN = Path("my_data/train")   # images + masks to train on
TEST = Path("my_data/test")     # images + masks to score the predictions against
WORK = Path("ddpmseg_work")     # feature stores, the run, the predictions and the report
NUM_CLASSES = 34                # the demo faces' classes (ffhq_34): set your own

cfg = ddpmseg.load_config().replace(
    data={"num_classes": NUM_CLASSES},
    classifier={"ensemble": 2, "max_epochs": 4},
)

# Features of every image: the bundled checkpoint brings its preset, steps and blocks.
for name, folder in (("train", TRAIN), ("test", TEST)):
    ddpmseg.extract(folder, WORK / f"{name}.zarr", cfg, checkpoint="bundled:faces_64",
                    resize=True)

# The pixel classifiers, then masks (and uncertainty maps) for the test images.
run = ddpmseg.fit(WORK / "train.zarr", WORK / "run", cfg)
ddpmseg.predict(run, WORK / "test.zarr", WORK / "preds", images=TEST, uncertainty=True)

# Scores against your masks (brought to 64 px as the images were), and a report to look at.
result = ddpmseg.evaluate(WORK / "preds", TEST, resize=True)
print(f"mIoU {result['miou']:.1%} over {len(result['classes'])} classes")
for row in result["classes"]:
    if row["gt_pixels"]:
        print(f"  {row['index']:3d} {row['name']:20s} IoU {row['iou']:.1%}")
print("report:", ddpmseg.report(WORK / "preds", gt=TEST, resize=True))
