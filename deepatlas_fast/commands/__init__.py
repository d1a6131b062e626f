"""The subcommands of ``deepatlas-fast``: one module per command (or per closely related group).

Each module has ``add_parser(sub)``, which adds its subparser(s) to ``sub`` and sets ``run`` (a function
of the parsed arguments returning the exit status); :func:`deepatlas_fast.cli.build_parser` registers
them in the order of the ``--help`` listing. Modules import only the standard library at import time:
the rest is imported when a command runs, so that the CLI starts fast.
"""
