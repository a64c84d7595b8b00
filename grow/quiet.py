"""Messages from dependencies that tell a grow user nothing they can act on, filtered at the source.

bitsandbytes (>= 0.49) logs, at import, on CPUs with AVX512-BF16 only::

    Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. ...

It concerns the kernel of bitsandbytes' packed CPU inference layout, which grow turns off on
every 4-bit layer it creates (``grow.quant.quantize_block``), and fetching it would need the
Hugging Face kernel hub, which an offline run cannot reach. The filter drops exactly that
message and nothing else. It sits on the logger bitsandbytes uses, installed when ``grow`` is
imported: peft and transformers import bitsandbytes on their own, so it must already be in
place by then, and attaching a filter to a logger that does not exist yet simply creates it.
This module imports nothing but ``logging``, so ``import grow`` stays cheap.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHubMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_MESSAGE)


_FILTER = _DropKernelsHubMessage()


def install() -> None:
    """Attach the filter (idempotent: a filter object is added to a logger once)."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_FILTER)
