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

    def epoch(self, record, epochs: int, seconds_left: float) -> None:
        """One line per finetuning epoch (an evc.passes.train.Epoch): loss, top-1, throughput, time left."""
        top1 = f"  top-1 {record.top1:.2%}" if record.top1 is not None else ""
        minutes, seconds = divmod(round(seconds_left), 60)
        self.console.print(f"  epoch {record.epoch}/{epochs}  loss {record.loss:.4f}{top1}  "
                           f"{record.samples_per_s:,.0f} images/s  {minutes}:{seconds:02d} left", highlight=False)

    def note(self, message: str) -> None:
        """One line of a long stage's progress, as each of its items is done (a budget's candidates)."""
        self.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """Print a warning once per build."""
        if message not in self._warned:
            self._warned.add(message)
            print(f"warning: {message}", file=sys.stderr)
