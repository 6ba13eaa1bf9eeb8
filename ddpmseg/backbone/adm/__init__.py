"""guided-diffusion's ADM: its flags, UNet, checkpoints and the feature backbone over them."""
