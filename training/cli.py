"""The `asr` subcommands of the training package: ``register`` is the entry point (the commands: ``training.commands``)."""

from __future__ import annotations

import sys

from .commands import register

__all__ = ["register"]

if __name__ == "__main__":  # python -m training.cli ... is the same as asr ...
    from asr.cli import main

    sys.exit(main())
