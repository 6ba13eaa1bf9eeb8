"""Diffusion backbones: guided-diffusion's ADM UNet (its flags, schedules and checkpoints), and
diffusers' UNet2DModel and Stable Diffusion behind the same interface (``FeatureBackbone``)."""

from ddpmseg.backbone.base import FeatureBackbone
from ddpmseg.backbone.adm.checkpoint import check_state_dict, load_checkpoint, load_state_dict
from ddpmseg.backbone.diffusion import SCHEDULES, Schedule, get_schedule, q_sample
from ddpmseg.backbone.adm.extractor import DEFAULT_BLOCKS, DEFAULT_STEPS, Backbone
from ddpmseg.backbone.factory import describe_backbone, load_backbone
from ddpmseg.backbone.adm.flags import PRESETS, ModelFlags
from ddpmseg.backbone.adm.unet import UNetModel

__all__ = [
    "Backbone", "FeatureBackbone", "load_backbone", "describe_backbone",
    "ModelFlags", "PRESETS", "UNetModel",
    "Schedule", "SCHEDULES", "get_schedule", "q_sample",
    "load_state_dict", "load_checkpoint", "check_state_dict",
    "DEFAULT_STEPS", "DEFAULT_BLOCKS",
]
