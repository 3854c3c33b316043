"""Click parameter types, the one-line error wrapper and the polite options, shared by
``cli`` and ``cli_many`` (which import this, never each other's commands' module)."""

from __future__ import annotations

import functools
import sys

import click

from .config import parse_size
from .errors import StreamMergeError


class ByteSize(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = ByteSize()


class ByteRate(ByteSize):
    """A byte size per second: ``200MB``, ``200MB/s``, ``1GiB/s``."""

    name = "RATE"

    def convert(self, value, param, ctx):
        return super().convert(value.removesuffix("/s") if isinstance(value, str) else value, param, ctx)


def _polite(fn):
    """The options that keep a merge polite on a shared server (``polite.IoLimits``)."""
    options = [
        click.option("--io-nice", is_flag=True, help="Lower CPU and I/O priority (nice 10, ionice -c2 -n7)."),
        click.option("--max-read-rate", type=ByteRate(), default=None, help="Cap input reads, e.g. 200MB/s."),
        click.option(
            "--max-write-rate", type=ByteRate(), default=None, help="Cap output writes, e.g. 100MB/s."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _io(io_nice: bool, max_read_rate: int | None, max_write_rate: int | None):
    from .polite import IoLimits

    return IoLimits(max_read_rate or 0, max_write_rate or 0, io_nice)


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StreamMergeError as e:
            click.echo("\n".join(f"error: {line}" for line in str(e).splitlines()), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written to the output", err=True)
            sys.exit(130)

    return wrapper
