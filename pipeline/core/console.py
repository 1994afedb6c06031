"""The terminal: one rich console for messages, one progress bar style for long work."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def console():
    """The process's rich console (stdout, no syntax highlighting, long lines kept whole)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(highlight=False, soft_wrap=True)
    return _CONSOLE


_CONSOLE = None


def echo(msg: str) -> None:
    """Print one message line (rich markup allowed)."""
    console().print(msg)


@contextmanager
def progress(label: str, total: int | None, *, enabled: bool = True, transient: bool = False) -> Iterator:
    """A rich progress bar: ``with progress("fit", n) as advance: advance(1)``.

    Shows the description, a bar, done/total, items per second and elapsed time. Disabled (a no-op
    ``advance``) when ``enabled`` is false, e.g. on ranks other than 0.
    """
    if not enabled:
        yield lambda k=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*cols, console=console(), transient=transient) as prog:
        task = prog.add_task(label, total=total, rate="")

        def advance(k: int = 1) -> None:
            prog.advance(task, k)
            speed = prog.tasks[0].speed
            if speed:
                prog.update(task, rate=f"{speed:.1f}/s")

        yield advance
