"""grow: grow a masked-diffusion language model one transformer block at a time."""

__version__ = "0.1.0"

from grow import quiet as _quiet  # noqa: E402  (before anything can import bitsandbytes)

_quiet.install()
