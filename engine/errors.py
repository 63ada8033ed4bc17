"""Errors as users see them: one line naming what failed, the traceback only when asked for.

Every `profuser` command and `engine/train.py` run through `report_errors`: an exception prints
`profuser <command>: error: <message>` (the messages name the file, row, key or argument) and exits with
the exception's `exit_code` (2 for a bad config or a refused resume, 1 otherwise); `--debug` or
PROFUSER_DEBUG=1 re-raises it with its traceback. An unexpected exception type (a bug) says so and how
to get the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def report_errors(prog: str, fn, *args, debug: bool = False) -> int:
    """fn(*args) -> exit code, with any error reported as one line (module docstring); warnings are one
    line each too (no source line under them) unless debugging."""
    if not (debug or os.environ.get("PROFUSER_DEBUG") == "1"):
        warnings.formatwarning = _one_line
    try:
        return int(fn(*args) or 0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug or os.environ.get("PROFUSER_DEBUG") == "1":
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        expected = isinstance(exc, (ValueError, OSError, RuntimeError, LookupError, ImportError, ArithmeticError))
        hint = "" if expected else f" ({type(exc).__name__}; PROFUSER_DEBUG=1 prints the traceback)"
        print(f"{prog}: error: {msg}{hint}", file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", 1))
