"""grow: grow a masked-diffusion language model one transformer block at a time."""

__version__ = "0.1.0"
