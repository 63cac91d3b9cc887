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


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line (or its type), whitespace folded, cut to
    ``limit``: what a one-line error message quotes."""
    msg = str(getattr(e, "message", None) or e).strip()
    if not msg:
        return type(e).__name__
    return " ".join(msg.splitlines()[0].split())[:limit]
