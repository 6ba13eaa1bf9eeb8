"""Training (or fine-tuning) an ADM backbone on a folder of images: ``train_backbone``.

Modules: ``data`` (images in RAM, the resumable data order), ``losses`` (the DDPM objective),
``files`` (checkpoint I/O), ``ddp`` (process group plumbing), ``loop`` (``Trainer`` and
``train_backbone``). The schedule is ``backbone.diffusion.Schedule``, the one extraction and
sampling use too.
"""

from ddpmseg.backbone.train.data import DataOrder, center_crop, load_images
from ddpmseg.backbone.train.losses import training_losses
from ddpmseg.backbone.train.loop import Trainer, train_backbone

__all__ = ["train_backbone", "Trainer", "training_losses", "load_images", "center_crop",
           "DataOrder"]
