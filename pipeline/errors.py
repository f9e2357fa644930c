"""Errors the CLI reports as one line (the full traceback only with --debug)."""


class PipelineError(Exception):
    """A problem with inputs, outputs or state, reported as one clear line naming what is at fault."""
