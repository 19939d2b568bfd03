"""Ctrl-C while a command is still starting ends it as it does later: one ``interrupted`` line and
exit status 130, never a ``KeyboardInterrupt`` traceback from inside an import.

A command spends its first ~1.5 s (2 cores) importing torch and Triton, before any code of its own
could catch the interrupt: ``engine/__init__.py`` calls ``exit_on_ctrl_c_while_starting`` first,
and ``cli.run_cli`` hands Ctrl-C back to Python (``KeyboardInterrupt``) once the command runs.
Only a command is affected, never a program that imports ``engine``.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _started_as_command() -> bool:
    """``python -m engine...`` or the ``gpt2engine`` console script (not a program of someone
    else's that imports engine, nor ``python -m theirs`` whose package does)."""
    argv = getattr(sys, "orig_argv", [])  # the interpreter's own command line, options included
    if "-m" in argv[1:]:
        module = argv[argv.index("-m", 1) + 1:][:1]
        return bool(module) and module[0].split(".")[0] == "engine"
    return os.path.basename(sys.argv[0] if sys.argv else "") == "gpt2engine"


def _exit_interrupted(signum, frame):
    os.write(2, b"\ninterrupted\n")
    os._exit(EXIT_INTERRUPTED)  # mid-import: nothing of ours to flush or close yet


def exit_on_ctrl_c_while_starting() -> None:
    """When this process is one of our commands, make Ctrl-C exit at once, quietly."""
    if _started_as_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _exit_interrupted)
        except ValueError:  # not the main thread
            pass


def started() -> None:
    """The command runs and handles KeyboardInterrupt itself from here on."""
    if signal.getsignal(signal.SIGINT) is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
