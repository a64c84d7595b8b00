"""``grow`` command line: one function per subcommand, mapped in ``COMMANDS``.

User mistakes raise ``UserError``; ``main`` prints them as one line and exits with code 2.

    parser       the top-level parser and ``COMMANDS`` (subcommand -> function)
    train        grow train: a fresh start, --resume, --from-stage
    status       grow status: one line per stage of a run, and what comes next
    plan         grow plan: memory, FLOPs and time (grow.plan), or --fit
    sample_eval  grow sample and grow eval, with the flag checks they share
    data         grow data prepare / inspect
    export       grow export (and --push-to-hub)
    ablate       grow ablate
"""

from __future__ import annotations

import errno
import os
import sys

from grow.cli.parser import COMMANDS, build_parser
from grow.errors import UserError

__all__ = ["COMMANDS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # A command returns None (success) or an exit code for failures that are not user input.
        code = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"grow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:
        from grow.checkpoint import Preempted
        from grow.store import StorageError

        if isinstance(exc, StorageError):  # the OS refused a write: not the user's input, but one line
            print(f"grow: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            # Anywhere else (a log, metrics, a report): stages and checkpoints are written whole or not at all.
            print(f"grow: error: {exc.strerror}: {exc.filename or 'a write'}; every stage and checkpoint "
                  "committed before is intact", file=sys.stderr)
            return 1
        if not isinstance(exc, Preempted):
            raise
        print(f"grow: {exc}; continue with --resume", file=sys.stderr)
        return 143
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()
    return code or 0


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def _closed_pipe() -> int:
    """The reader of our output went away (``grow status RUN | head -1``): stop quietly.

    stdout is pointed at /dev/null so the interpreter's final flush does not complain either;
    the exit code is the shell's for a process ended by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured by a test): nothing to redirect
        pass
    return 141
