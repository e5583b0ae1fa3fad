"""Progress for long stages: a spinner on a terminal, silence elsewhere."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console


class Progress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._warned: set[str] = set()

    @contextmanager
    def stage(self, what: str):
        if not self.console.is_terminal:
            yield
            return
        with self.console.status(f"{what}…"):
            yield
        self.console.print(f"[green]✓[/] {what}")

    def warn(self, message: str) -> None:
        """Print a warning once per build."""
        if message not in self._warned:
            self._warned.add(message)
            print(f"warning: {message}", file=sys.stderr)
