"""What every stage's ``main(argv)`` shares: logging set-up, the bad-input exit path, and options made from config
keys (the flag, the config key and the core function's keyword share one name; type, default, choices and help
come from the schema)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from stages.core.config import schema_property
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


def parse_bool(text: str) -> bool:
    """``true``/``false`` (any case, as Snakemake writes a Python bool: ``True``), ``1``/``0``, ``yes``/``no``."""
    v = text.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (true or false)")


_TYPES = {"number": float, "integer": int, "string": str, "boolean": parse_bool}


def add_config_args(p: argparse.ArgumentParser, section: str, keys: Sequence[str]) -> None:
    """One option ``--key-name`` per config key of ``section`` (e.g. ``iou_thr`` -> ``--iou-thr``), typed, with
    the schema's default, enum and description."""
    for key in keys:
        node = schema_property(section, key)
        desc = node.get("description", "").replace("%", "%%")
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=_TYPES[node["type"]], default=node["default"],
                       choices=node.get("enum"), metavar="{true,false}" if node["type"] == "boolean" else None,
                       help=f"{desc} (default: %(default)s)".lstrip())


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """The options of a stage that streams image shards of detections (memory and device; not config keys)."""
    p.add_argument("--rows-per-shard", type=int, default=1 << 20, help="rows processed at once (memory bound)")
    p.add_argument("--device", default=None,
                   help="auto (default): torch on CUDA when a GPU is visible, else numpy on the CPU; cpu; "
                   "cuda[:N]")

def json_object(text: str, *, flag: str = "--config") -> dict:
    """The JSON object a CLI flag carries (a rule passes a config section as JSON); InputError naming the flag
    when it is not JSON or not an object."""
    import json

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} is not JSON: {exc}", field=flag) from exc
    if not isinstance(obj, dict):
        raise InputError(f"{flag} must be a JSON object", field=flag)
    return obj
