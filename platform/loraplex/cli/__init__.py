"""The ``loraplex`` command line: one module per command group, wired in ``main``.

Owns: argument parsing, rendering results for a terminal, and turning errors into one
line plus an exit code. Does not own: the work itself, which lives in the library.

A command imports the library module that does its work inside the command function,
the one exception to imports at the top (DESIGN.md): ``loraplex --help`` took 0.7 s
with them here and 1.2-1.3 s with them at the top on a 2-core machine (numpy,
jsonschema, the evaluation and serving modules are loaded only by the commands that use
them), a cost every command and every test that runs the console script would pay.
"""
