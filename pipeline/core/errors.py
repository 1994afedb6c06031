"""The one exception type that reaches the user as a single line (see ``pipeline.cli.app``)."""


class PipelineError(Exception):
    """A user-facing error: bad input, missing weights, refused overwrite.

    The message is one line that names the file and what was expected; the CLI prints it
    and exits with status 1 (``--debug`` shows the traceback).
    """
