"""genbench: diffusion, consistency, VAE and flow generators compared on 2D data."""
__version__ = "0.1.0"
