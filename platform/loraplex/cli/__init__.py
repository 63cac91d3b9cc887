"""The ``loraplex`` command line: one module per command group, wired in ``main``.

Owns: argument parsing, rendering results for a terminal, and turning errors into one
line plus an exit code. Does not own: the work itself, which lives in the library.
"""
