"""Errors the CLI reports as one line (the full traceback only with --debug)."""

WORKER_PREFIX = "Caught "  # how torch's DataLoader begins the text of an error raised in a worker process


class PipelineError(Exception):
    """A problem with inputs, outputs or state, reported as one clear line naming what is at fault.

    Raised in a ``torch.utils.data.DataLoader`` worker, it reaches the iterating process made anew
    from torch's text ("Caught PipelineError in DataLoader worker process 0. Original Traceback
    ..."); its message is then the original line again (:func:`worker_message`), so a user of the
    public dataset gets the error the CLI prints."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (worker_message(args[0], type(self)),)
        super().__init__(*args)


class ConfigError(PipelineError):
    """A config problem, reported as one line naming the key path at fault."""


def worker_message(text: str, cls: type) -> str:
    """The original message inside torch's report of an exception of type ``cls`` raised in a
    DataLoader worker (the end of its traceback, after ``module.Class: ``), else ``text``."""
    if not text.startswith(WORKER_PREFIX) or "\nOriginal Traceback" not in text:
        return text
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3:].strip() if at >= 0 else text
