"""genbench: diffusion, consistency models, VAEs, flows, GANs and plugins compared on 2D data."""
__version__ = "0.1.0"
