"""The one error path of the `asr` command.

A subcommand's handler raises; ``asr.cli.main`` prints ``error: <message>`` and exits with ``EXIT_USAGE`` for every
error that ``REPORTED_ERRORS`` names: a ``ValueError`` (bad input, a damaged model file, a wrong setting), an
``OSError`` (a missing file, a refused connection) or a ``CommandError`` (what else a user can act on). Anything else
is a bug and keeps its traceback; ``ASR_TRACEBACK=1`` shows the traceback of reported errors too.
"""

from __future__ import annotations

EXIT_SOME_FAILED = 1  # some inputs of a batch failed; the others were done
EXIT_USAGE = 2


class CommandError(RuntimeError):
    """An error whose message tells the user what went wrong and what to do (a microphone that cannot be opened, a
    tool that failed to build): reported without a traceback."""


REPORTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, CommandError)
