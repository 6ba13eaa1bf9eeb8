"""The feature layout of the published 256px checkpoints, derived from the lsun_256 preset.

Shared by the memory benchmarks so their synthetic stores have exactly the shapes extraction
would write (the UNet is built on the meta device: no weights, no time).
"""

import torch

from ddpmseg.backbone import ModelFlags, UNetModel

STEPS = (50, 150, 250)
BLOCKS = (5, 6, 7, 8, 12)
_FLAGS = ModelFlags.resolve("lsun_256")
with torch.device("meta"):
    _DECODER = UNetModel.from_flags(_FLAGS).decoder_shapes   # (channels, downsample rate)
SIZE = (_FLAGS.image_size, _FLAGS.image_size)
PER_STEP = tuple((_DECODER[b][0], SIZE[0] // _DECODER[b][1], SIZE[1] // _DECODER[b][1])
                 for b in BLOCKS)
FEATURE_DIM = sum(c for c, _, _ in PER_STEP) * len(STEPS)
