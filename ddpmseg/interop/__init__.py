"""The reference code's formats (ddpm-segmentation): its ddpm.json configs and its trained
classifiers, read and written."""
