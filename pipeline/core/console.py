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


def echo(msg: str, *, markup: bool = True) -> None:
    """Print one message line; ``markup=False`` prints ``[...]`` literally (log lines, file names)."""
    console().print(msg, markup=markup)


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

    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*cols, console=console(), transient=transient) as prog:
        task = prog.add_task(label, total=total, rate="")

        def advance(k: int = 1) -> None:
            prog.advance(task, k)
            speed = prog.tasks[0].speed
            if speed:
                prog.update(task, rate=f"{speed:.1f}/s")

        yield advance


# ------------------------------------------------------------------------------------- Ctrl-C
class Interrupted(Exception):
    """A run stopped at a step boundary after Ctrl-C; :func:`pipeline.cli.app.main` prints
    :attr:`message` as one line and exits 130.

    Args:
        kept: what is on disk now, e.g. ``"runs/cls/weights/last.pt (epoch 3 of 10)"``, or ``None``
            when nothing resumable was written (the run's own files were removed).
        resumable: whether ``--resume`` continues from ``kept``.
    """

    def __init__(self, kept: str | None, *, resumable: bool):
        self.kept = kept
        self.resumable = resumable
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.resumable:
            return f"interrupted: kept {self.kept}; resume with: {command_line(resume=True)}"
        kept = f"kept {self.kept}" if self.kept else "nothing kept"
        return f"interrupted: {kept}; start again with: {command_line(resume=False)}"


def command_line(*, resume: bool) -> str:
    """The command this process runs, shell-quoted, with ``--resume`` (and without ``--force``) to
    continue, or without ``--resume`` to start again."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if a not in ("--resume", "--force")]
    if resume:
        args.append("--resume")
    return shlex.join(["pipeline", *args])


class StopFlag:
    """Set by the first Ctrl-C inside :func:`stop_on_interrupt`; long loops poll :attr:`requested`
    at step boundaries (an epoch, a batch of images) and stop cleanly there."""

    def __init__(self) -> None:
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def stop_on_interrupt(what: str = "this step") -> Iterator[StopFlag]:
    """Turn the first SIGINT into a request to stop after the current step; a second aborts at once.

    The first Ctrl-C prints one line and sets the yielded flag; the code polls it, writes what can
    be resumed and raises :class:`Interrupted`. A second Ctrl-C raises ``KeyboardInterrupt`` (exit
    130 too). Outside the main thread (where signals cannot be caught) the flag is never set.
    """
    import signal
    import threading

    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        import sys

        print(f"stopping after {what} (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
