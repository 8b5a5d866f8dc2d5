"""sloth-daemon: continuous online LoRA fine-tuning service.

Importing the package quietens one misleading third-party warning (below); it does nothing else.
"""

import logging


class _NoKernelsHubHint(logging.Filter):
    """bitsandbytes' CPU backend (on CPUs with AVX512-BF16) warns at import, in every process that loads it (daemon,
    trainer, `export`), that Hugging Face's `kernels` hub package is missing and asks to `pip install kernels`. That
    package would download a kernel from the Hub at run time (which this daemon never reaches), and its import name is
    the one DESIGN.md keeps free; bitsandbytes' own CPU code serves. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubHint())

__version__ = "0.1.0"
