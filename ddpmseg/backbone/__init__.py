"""Diffusion backbones: guided-diffusion's ADM UNet (its flags, schedules and checkpoints), and
diffusers' UNet2DModel and Stable Diffusion behind the same interface (``FeatureBackbone``)."""

from ..fileio import sha256_file
from .base import FeatureBackbone
from .checkpoint import check_state_dict, load_checkpoint, load_state_dict
from .diffusion import SCHEDULES, Schedule, get_schedule, q_sample
from .extractor import DEFAULT_BLOCKS, DEFAULT_STEPS, Backbone
from .factory import describe_backbone, load_backbone
from .flags import PRESETS, ModelFlags
from .ident import BackboneId
from .unet import UNetModel

__all__ = [
    "Backbone", "BackboneId", "FeatureBackbone", "load_backbone", "describe_backbone",
    "ModelFlags", "PRESETS", "UNetModel",
    "Schedule", "SCHEDULES", "get_schedule", "q_sample",
    "load_state_dict", "load_checkpoint", "check_state_dict", "sha256_file",
    "DEFAULT_STEPS", "DEFAULT_BLOCKS",
]
