"""Silence what our dependencies say about themselves, one message at a time.

Each entry names one exact message a dependency prints on every run, which a user can do nothing
about; our own warnings, and any message not listed, still show. Causes in our own code are
fixed where they are, not filtered here.
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, start of the message, who says it and why it is harmless)
DEPENDENCY_WARNINGS = (
    # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # torch.export pickles its own pytree specs and trips torch's own deprecation.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)

# torch.onnx's exporter logs "torchvision is not installed. Skipping torchvision::nms" (and three
# more) each time it builds its registry; splitlm never needs torchvision's ops.
# bitsandbytes (imported by peft whenever it is installed) logs on CPUs with AVX512-BF16 that it
# could not fetch an optional kernel from the hub ("Failed to load CPU gemm_4bit_forward from
# kernels-community"); its own CPU kernels run instead.
DEPENDENCY_LOGGERS = ("torch.onnx._internal.exporter._registration", "bitsandbytes.backends.cpu.ops")

# (logger, start of the message): single log messages of a logger whose other messages still show.
DEPENDENCY_LOG_MESSAGES = (
    # --body-quant int8: LLM.int8() quantizes float32 activations through float16, by design; said every step.
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_dependencies() -> None:
    """Install the filters above; call before the dependencies are imported. Idempotent."""
    for category, message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in DEPENDENCY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, start in DEPENDENCY_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    # transformers' "Loading weights" bar: a flash of carriage returns in every log; we say
    # "loading ..." ourselves. A user who wants it back sets HF_HUB_DISABLE_PROGRESS_BARS=0.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
