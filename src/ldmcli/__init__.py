"""ldm: Stable Diffusion text-to-image from the command line."""

__version__ = "0.1.0"
