"""Stable Diffusion 1.x's feature layout at 512px: up_blocks 1, 2, 3 at steps 50, 150, 250.

Derived from SD 1.x's UNet configuration (the widths of diffusers' UNet2DConditionModel) by the
same function the Stable Diffusion backbone uses, without building the model. The VAE shrinks
512px images 8x to 64x64 latents; up_blocks 1-3 work at 16, 32 and 64 px latents and output
(1280, 32, 32), (640, 64, 64) and (320, 64, 64): 2240 dims per step, 6720 for 3 steps.
"""

from ddpmseg.backbone.hf.unet2d import up_block_shape

# SD 1.x (v1-4, v1-5): unet/config.json and vae/config.json.
UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                   attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512), sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012)
TEXT_TOKENS, TEXT_DIM = 77, 768

STEPS = (50, 150, 250)
BLOCKS = (1, 2, 3)
SIZE = (512, 512)
LATENT = SIZE[0] // 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
PER_STEP = tuple(up_block_shape(UNET_CONFIG["block_out_channels"], LATENT, b) for b in BLOCKS)
FEATURE_DIM = sum(c for c, _, _ in PER_STEP) * len(STEPS)


def random_backbone(seed: int = 0, device: str = "cpu"):
    """A full-size SD 1.x UNet + VAE with random weights (PyTorch's default init, seeded) and a
    random prompt embedding in place of CLIP's: sizes and speeds as the real model's."""
    import diffusers
    import torch

    from ddpmseg.backbone.hf.sd import StableDiffusionBackbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
        vae = diffusers.AutoencoderKL(**VAE_CONFIG)
        embedding = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    return StableDiffusionBackbone(unet, vae, embedding, diffusers.DDPMScheduler(**SCHEDULER_CONFIG),
                                   sha256=f"random-sd15-{seed}", device=device)
