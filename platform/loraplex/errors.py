"""The exceptions that end a loraplex command with a one-line message.

Owns: the small hierarchy the CLI turns into ``loraplex: error: ...`` plus an exit
code. Does not own: printing (the CLI does that) or HTTP errors (serving does).
"""

from __future__ import annotations


class LoraplexError(Exception):
    """An error a user can act on; its message is one line, its exit code non-zero."""

    exit_code: int = 1


class ConfigError(LoraplexError):
    """A configuration file, environment variable or flag that cannot be used."""

    exit_code = 2


class InputError(LoraplexError):
    """A bad argument or input file given to a command."""

    exit_code = 2
