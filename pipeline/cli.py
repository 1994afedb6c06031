"""The ``pipeline`` command line (Typer). Each command is a thin typed function: it parses
options, calls one library function, and prints what it wrote. Heavy libraries are imported
inside the commands so ``pipeline --help`` stays instant.

Errors of type :class:`pipeline.errors.PipelineError` reach the user as one line and exit 1;
``pipeline --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Industrial visual inspection on MVTec AD-layout data.")
finetune_app = typer.Typer(no_args_is_help=True, help="Train a model: yolo, sam, classifier, anomaly.")
predict_app = typer.Typer(no_args_is_help=True, help="Run a trained model over a split and write predictions.")
export_app = typer.Typer(no_args_is_help=True, help="Export predictions for human review.")
import_app = typer.Typer(no_args_is_help=True, help="Import reviewed labels back.")
app.add_typer(finetune_app, name="finetune")
app.add_typer(predict_app, name="predict")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")

_STATE = {"debug": False}


def echo(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False).print(msg)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    """Industrial visual inspection on MVTec AD-layout data."""
    _STATE["debug"] = debug


# ----------------------------------------------------------------------------- data (issue 2)
# (commands added below by the foundation)

# ----------------------------------------------------------------------------- YOLO-World (issue 2)

# ----------------------------------------------------------------------------- SAM (issue 3)

# ----------------------------------------------------------------------------- classifier (issue 4)

# ----------------------------------------------------------------------------- anomaly (issue 5)

# ----------------------------------------------------------------------------- evaluate / review


def main() -> None:
    """Console entry point: run the app, turning :class:`PipelineError` into one line and exit 1."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
