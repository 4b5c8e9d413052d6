"""Shared rich consoles: reports and tables go to stdout, logs and progress to stderr.

On a terminal (or in a notebook) they print rich tables, colours and progress bars. Anywhere
else - a pipe, a CI log, a file - they print plain lines that never wrap: text is written whole,
and a table becomes its title, its header and one line per row, the cells in aligned columns,
so `flm data check ... | grep landmarks.csv:5` finds the whole row. `log_handler` makes the same
choice for log records.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text


class FlmConsole(Console):
    """A rich Console that prints plain, unwrapped lines when its file is not a terminal."""

    @property
    def plain(self) -> bool:
        """True where output is read by a program or kept in a log: not a terminal, not a notebook."""
        return not self.is_terminal and not self.is_jupyter

    def print(self, *objects, **kwargs) -> None:
        if self.plain:
            objects = tuple(self.plain_table(o) if isinstance(o, Table) else o for o in objects)
            kwargs["soft_wrap"] = True  # no wrapping, no cropping at the (guessed) width
        super().print(*objects, **kwargs)

    def plain_table(self, table: Table) -> Text:
        """The table as plain lines: the title, the header if shown, then one line per row; the
        cells two spaces apart, justified as their columns say; a cell's line breaks become spaces."""
        def cell_text(cell) -> str:
            if isinstance(cell, str):  # a str cell is rich markup, as in the table itself
                cell = self.render_str(cell)
            text = cell.plain if isinstance(cell, Text) else str(cell)
            return " ".join(text.splitlines())

        columns = table.columns
        rows = [[cell_text(c.header) for c in columns]] if table.show_header else []
        rows += [list(row) for row in zip(*([cell_text(cell) for cell in c.cells] for c in columns))]
        widths = [max((len(row[k]) for row in rows), default=0) for k in range(len(columns))]
        lines = [cell_text(table.title)] if table.title else []
        for row in rows:
            cells = [v.rjust(w) if c.justify == "right" else v.ljust(w) for v, w, c in zip(row, widths, columns)]
            lines.append("  ".join(cells).rstrip())
        if table.caption:
            lines.append(cell_text(table.caption))
        return Text("\n".join(lines))


console = FlmConsole(stderr=True)  # logs, progress bars, errors
out = FlmConsole()  # tables and results a user may pipe


class _PlainHandler(logging.Handler):
    """Log records as whole lines on the console's file (`message`; `warning: message` for
    warnings and worse), looked up on every record so a replaced sys.stderr is followed."""

    def __init__(self, target: Console):
        super().__init__()
        self.target = target

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.target.file
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def log_handler() -> logging.Handler:
    """Where `flm`'s log records go: rich (time, level, wrapped to the terminal) on a terminal,
    plain lines that never wrap anywhere else (see `FlmConsole.plain`)."""
    if console.plain:
        handler = _PlainHandler(console)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    return RichHandler(console=console, show_path=False)
