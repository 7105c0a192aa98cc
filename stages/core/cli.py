"""What every stage's ``main(argv)`` shares: logging set-up and the bad-input exit path."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from stages.core.errors import InputError

EXIT_BAD_INPUT = 2


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("ORCHARD_LOG", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def stage_main(fn: Callable[[Sequence[str] | None], None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a stage's ``main``: configure logging, turn :class:`InputError` into a clear message and exit 2."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        setup_logging()
        try:
            fn(argv)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0

    return wrapper
