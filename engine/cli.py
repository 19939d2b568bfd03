"""What the three commands (generate, eval, serve) share, and ``gpt2engine`` / ``python -m engine``,
which runs one of them.

A user mistake ends in one ``error:`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from typing import Callable

from .model.backends import BACKENDS
from .interrupt import EXIT_INTERRUPTED, started
from .model.loader import DTYPES
from .model.quantize import QUANTIZE_MODES

EXIT_USER_ERROR = 2


def version_line() -> str:
    """``gpt2engine 0.1.0 (torch 2.13.0, triton 3.9.0, Python 3.11.7)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    python = ".".join(map(str, sys.version_info[:3]))
    return f"gpt2engine {installed('gpt2engine')} (torch {installed('torch')}, triton {installed('triton')}, " \
           f"Python {python})"


class CommandParser(argparse.ArgumentParser):
    """Every command's parser: one-line errors, and ``--version``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(), help="print versions and exit")

    def error(self, message):  # argparse prints usage too; one line is what we promise
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written and ends each option's help with its default (when it
    has one worth showing and the help does not already say it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unshown = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or unshown or isinstance(action, argparse._StoreFalseAction) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class UsageError(Exception):
    """A command-line mistake: ``run_cli`` prints it as one ``error:`` line and exits 2."""


def parse_number(text, kind, what):
    """``kind(text)``, or the message argparse prints for a value that is not a number at all."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None


def float_in(name, interval, inside):
    """A float parser for option ``name`` accepting what ``inside(v)`` accepts; errors name the
    ``interval`` ("[0, 1]", "(0, inf)", ...). NaN is never inside: every comparison with it is false."""
    def parse(text):
        v = parse_number(text, float, f"{name} must be a number in {interval}")
        if not (math.isfinite(v) and inside(v)):
            raise argparse.ArgumentTypeError(f"{name} must be in {interval}, got {text}")
        return v
    return parse


def int_in(name, low, high=math.inf, rule=None):
    """An int parser for option ``name`` accepting [low, high]; errors say the ``rule`` ("in
    [0, 2^63)", ...; default "in [low, high]", or ">= low" without a high bound)."""
    rule = rule or (f">= {low}" if high == math.inf else f"in [{low}, {high}]")

    def parse(text):
        v = parse_number(text, int, f"{name} must be an integer {rule}")
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{name} must be an integer {rule}, got {text}")
        return v
    return parse


def int_at_least(name, low):
    """An int parser for option ``name`` accepting [low, inf)."""
    return int_in(name, low)


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); UsageError naming ``source`` and the
    offset of the first byte that is not UTF-8, rather than replacing it and going on."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{source} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"({e.reason})") from None


def utf8_argument(text: str, option: str) -> str:
    """An argument as given: Python reads the command line's bytes that are not UTF-8 as lone
    surrogates, refused here as a file's would be (``decode_utf8``)."""
    return decode_utf8(text.encode("utf-8", "surrogateescape"), option)


def read_text(path: str | None, option: str) -> str | None:
    """The UTF-8 text of file ``path`` (``option`` names it in errors), or with ``path`` None of
    standard input, or None when standard input is a terminal (nothing was piped)."""
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read {option} {path}: {e.strerror or e}") from None
        return decode_utf8(data, f"{option} {path}")
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return decode_utf8(sys.stdin.buffer.read(), "standard input")


def _control_parser(control):
    """The parser of ``--<control>``: a number (an integer for an integer control) that the
    control's own check accepts; errors name the option and the control's interval."""
    import gpt2kernels

    flag, integer = "--" + control.name.replace("_", "-"), not control.dtype.is_floating_point
    penalty = control in gpt2kernels.PENALTY_CONTROLS
    check = gpt2kernels.check_penalties if penalty else gpt2kernels.check_sampling_params

    def parse(text):
        kind = "an integer" if integer else "a number"
        v = parse_number(text, int if integer else float, f"{flag} must be {kind} in {control.interval}")
        try:
            check(**{control.name: v})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {'an integer ' if integer else ''}in "
                                             f"{control.interval}, got {text}") from None
        return v
    return parse


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One option per sampling and penalty control (``gpt2kernels``' tables), named, checked,
    defaulted and explained by its row."""
    import gpt2kernels

    for control in gpt2kernels.CONTROLS:
        p.add_argument("--" + control.name.replace("_", "-"), type=_control_parser(control), default=control.off,
                       help=control.help)


def sampling_options(args: argparse.Namespace) -> dict:
    """The values of ``add_sampling_options``' options, by control name (``generate``'s keywords)."""
    import gpt2kernels

    return {c.name: getattr(args, c.name) for c in gpt2kernels.CONTROLS}


def add_placement_options(p: argparse.ArgumentParser, dtype_help: str,
                          backend_help: str = "default: triton on a CUDA device, eager on CPU") -> None:
    """--device, --dtype, --backend and --quantize, as every command takes them (each says its dtype's default)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    p.add_argument("--backend", choices=sorted(BACKENDS), default=None, help=backend_help)
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="weight-only int8 with per-channel scales computed at load: int8 quantises the four "
                        "linears of every block, int8-all the lm_head too (the fastest on CPU); see the README "
                        "for its accuracy (default: none)")


def run_cli(build: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
            argv: list[str] | None, prog: str | None = None) -> int:
    """Parse ``argv`` with ``build()``'s parser (named ``prog`` when given) and ``run`` the command:
    a usage mistake is one ``error:`` line and exit status 2, Ctrl-C exit status 130, a closed
    stdout (``| head``) 0. Output the terminal cannot encode is replaced, never a crash, and a
    library's warning is one ``warning:`` line."""
    started()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    try:
        parser = build()
        if prog:
            parser.prog = prog
        return run(parser.parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    finally:
        warnings.formatwarning = previous_format


COMMANDS = {"generate": "engine.generate", "eval": "engine.eval", "serve": "engine.serve.__main__"}


def unknown_command(word: str) -> str:
    """What to say about ``gpt2engine WORD`` when WORD is no command (generate takes no positional
    argument): the command it probably meant (``evaluate`` -> eval), else the list."""
    import difflib

    close = [c for c in COMMANDS if word.startswith(c) or c.startswith(word)] or \
        difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown command {word!r}: {hint}commands: {', '.join(COMMANDS)} (generate is the default: " \
           f"give its prompt with --prompt)"


def entry(argv: list[str] | None = None) -> int:
    """``gpt2engine [generate|eval|serve] ...`` (also ``python -m engine``): the named command's
    ``main``; without a command name, ``generate``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = "gpt2engine" if sys.argv and sys.argv[0].endswith("gpt2engine") else "python -m engine"
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        started()
        print(f"error: {unknown_command(argv[0])}", file=sys.stderr)
        return EXIT_USER_ERROR
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "generate"
    return importlib.import_module(COMMANDS[command]).main(argv, prog=f"{name} {command}")
