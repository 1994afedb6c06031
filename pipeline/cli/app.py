"""The ``pipeline`` command line (Typer). Each command is a thin typed function: it parses
options, calls one library function, and prints what it wrote. Heavy libraries are imported
inside the commands so ``pipeline --help`` stays instant.

Errors of type :class:`pipeline.core.errors.PipelineError` reach the user as one line and exit 1;
``pipeline --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from pipeline.cli import data, evaluate, inspect, predict, review, train
from pipeline.core.console import Interrupted, command_line
from pipeline.core.errors import PipelineError


def _flags_take_no_value() -> None:
    """Typer 0.29's rich help prints a ``<bool>`` type after every flag (``--force <bool>``), which
    reads as if the flag took a value; a flag takes none, so its type column is left empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_pipeline_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._pipeline_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Industrial visual inspection on MVTec AD-layout data."
)
app.command("synth-mvtec")(data.synth_mvtec)
app.command("convert-masks")(data.convert_masks)
app.add_typer(data.dataset_app, name="dataset")
app.add_typer(train.finetune_app, name="finetune")
app.add_typer(predict.predict_app, name="predict")
app.command("evaluate")(evaluate.evaluate)
app.command("report")(evaluate.report)
app.add_typer(review.export_app, name="export")
app.add_typer(review.import_app, name="import")
app.command("bundle")(inspect.bundle)
app.command("inspect")(inspect.inspect)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    """Industrial visual inspection on MVTec AD-layout data."""


def main() -> None:
    """Console entry point: run the app, turning :class:`PipelineError` into one line and exit 1."""
    debug = "--debug" in sys.argv[1:]
    if not debug:  # a library warning reaches the user as one line, not as a source listing
        import warnings

        warnings.showwarning = lambda message, category, *_a, **_k: print(f"warning: {message}", file=sys.stderr)
    try:
        code = app(standalone_mode=False)
        # typer turns a KeyboardInterrupt into a returned 130 when not standalone: exit with it
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as exc:
        print(exc.message, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(
            "aborted (Ctrl-C): a run folder without a checkpoint is removed, one with a checkpoint continues "
            f"with --resume; start again with: {command_line(resume=False)}",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as exc:  # usage errors, --help exits, aborts (typer vendors click: match by shape)
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        message = getattr(exc, "format_message", lambda: "")()
        if message:  # a usage error: one line, with where to look (help already shown has none)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
