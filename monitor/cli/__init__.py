"""The ``interlatent`` command: one module per group of subcommands; ``main`` builds the parser."""

from monitor.cli.main import main

__all__ = ["main"]
