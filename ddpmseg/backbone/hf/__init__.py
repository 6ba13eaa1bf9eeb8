"""Hugging Face diffusers backbones: a UNet2DModel folder (unet2d.py) and Stable Diffusion (sd.py).
diffusers is imported only when one is used."""
