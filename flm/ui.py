"""Shared rich consoles: reports and tables go to stdout, logs and progress to stderr."""

from rich.console import Console

console = Console(stderr=True)  # logs, progress bars, errors
out = Console()  # tables and results a user may pipe
