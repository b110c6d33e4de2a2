"""What a `fastnpo` command prints: fastnpo's own lines and real warnings, not third-party noise.

Imported by the CLI before anything heavy, so the filters are in place before the libraries that
log at import time (transformers imports torchao when it is installed) are imported.
"""

import contextlib
import logging
import os

# Messages, by the logger that emits them, that say nothing a fastnpo user can act on:
# - torchao's optional C++/CUDA extensions (MX formats, CUTLASS) fail to load on a CPU or on a torch
#   they were not built for; fastnpo never uses them (its 8-bit AdamW is plain PyTorch).
# - torch tells torchao that an Enum it registers is now natively supported (a deprecation for torchao).
NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}
# Progress bars of datasets: a "Generating train split" bar per local JSON file. A user who wants them
# back sets the variable to 0.
DATASETS_BARS = "HF_DATASETS_DISABLE_PROGRESS_BARS"


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Drop the NOISE messages (only those: other warnings and every error still show), turn off
    datasets' bars unless the user set their variable, and transformers' own bars (weights loaded,
    shards written: a bar per file, fastnpo says what it loads) while keeping huggingface_hub's
    download bars, the one sign of progress while a multi-GB checkpoint downloads. Idempotent."""
    os.environ.setdefault(DATASETS_BARS, "1")
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns off huggingface_hub's bars too
    if downloads_shown:
        enable_progress_bars()


@contextlib.contextmanager
def library_bars_off():
    """No "Loading weights" / "Generating train split" bar per model and split while a demo runs (one
    line per stage in its log: 29 and 14 of those bars per TOFU demo); the settings are restored after."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # turns off huggingface_hub's bars too
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if was[1]:
            hf_logging.enable_progress_bar()
        # after transformers' switch, which turns huggingface_hub's bars on or off with its own
        (enable_progress_bars if was[2] else disable_progress_bars)()
