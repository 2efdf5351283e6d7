"""User-facing errors: the CLI and the server print these as one line, never a traceback."""


class MmtError(Exception):
    """An error caused by user input (bad model argument, bad file, bad prompt...)."""


class ModelNotFoundError(MmtError):
    pass


class ModelFormatError(MmtError):
    """A model file that is missing, truncated, corrupt or of an unsupported architecture."""


class PromptError(MmtError):
    """An empty prompt or one longer than the model's context."""
