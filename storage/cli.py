"""One clear line per mistake: the wrapper every command-line entry point runs its ``main`` in.

    def main(argv=None) -> int:
        return run_cli(_main, argv)

A mistake the user can fix (a path that does not exist, a malformed dataset or config, missing
credentials, a failed job) is printed as one line, ``error: <what>, <where>, <what to do>``, on
stderr and the command exits 1. ``--debug`` anywhere on the command line (it is removed before
``main`` sees it) or ``VQPT_DEBUG=1`` prints the traceback as well; ``--debug`` also sets
``VQPT_DEBUG=1`` so jobs and ranks started by the command inherit it. Anything else (a bug) keeps
Python's traceback. Ctrl-C exits 130 with one line.

"The project's own error types" are ``ValueError`` (``storage.errors.StorageError`` and config
errors are ValueErrors), ``OSError`` (missing files, permissions, network), ``UserError`` and
botocore's credential errors (reported naming the variables that supply credentials).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from storage.io import CREDENTIALS_HELP as _CREDENTIALS_HELP
from storage.io import is_credentials_error as _is_credentials_error

__all__ = ["UserError", "run_cli", "run_script", "debug_enabled", "one_line", "is_user_error"]


class UserError(Exception):
    """A mistake of the user's that is not a ValueError/OSError (a failed job, a bad combination of flags)."""


def debug_enabled() -> bool:
    return os.environ.get("VQPT_DEBUG", "") not in ("", "0")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake reported in one line (see the module docstring)."""
    if isinstance(err, ValueError | OSError | UserError):
        return True
    return _is_credentials_error(err)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (credentials errors get what to set)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if _is_credentials_error(err):
        return f"no S3 credentials found ({text}); {_CREDENTIALS_HELP}"
    return text


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
            quiet: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``, ``--debug`` removed); returns the exit code.

    ``quiet``: user-error types this process exits 1 on without printing (another process reports them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["VQPT_DEBUG"] = "1"
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        if isinstance(err, quiet) and not debug_enabled():
            return 1
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return 1
    return 0 if rc is None else int(rc)


def run_script(main: Callable[[list[str]], object]) -> None:
    """``if __name__ == "__main__": run_script(main)`` for a script whose ``main(argv)`` returns a result
    (a report dict, or an int exit code): exits with ``run_cli``'s code."""
    sys.exit(run_cli(lambda argv: (r if isinstance(r := main(argv), int) and not isinstance(r, bool) else 0), None))
