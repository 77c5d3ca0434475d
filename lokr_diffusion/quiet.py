"""Third-party messages that say nothing about the user's work, dropped by their exact text.

Why: every command loads Diffusers pipelines, which import transformers' image processors for
the safety checker and image encoders; without torchvision installed (it is no dependency of
this project: nothing here reads images through it) transformers then logs, once per class,
"`CLIPImageProcessor` requires torchvision (not installed); falling back to
`CLIPImageProcessorPil` ...", and the same for `SiglipImageProcessor`. Those two lines were the
first thing every command printed. Only records matching that sentence are dropped, on the
one logger that emits it; every other warning, of transformers or anyone, still shows.
"""
from __future__ import annotations

import logging
import re

__all__ = ["UNRELATED", "silence_unrelated_warnings"]

# (logger name, pattern of the message) of each dropped record
UNRELATED: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("transformers.utils.import_utils",
     re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`")),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_unrelated_warnings() -> None:
    """Install the filters (idempotent); called at the start of the CLI and the trainer.

    The loggers are fetched by name, so this works before transformers is imported and keeps
    working after transformers configures its own handlers.
    """
    for name, pattern in UNRELATED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
