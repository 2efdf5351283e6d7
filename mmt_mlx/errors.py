"""User-facing errors: the CLI and the server print these as one line, never a traceback."""


class MmtError(Exception):
    """An error caused by user input (bad model argument, bad file, bad prompt...)."""


class ModelNotFoundError(MmtError):
    pass


class ModelFormatError(MmtError):
    """A model file that is missing, truncated, corrupt or of an unsupported architecture."""


class PromptError(MmtError):
    """An empty prompt or one longer than the model's context."""


class EmptyPromptError(PromptError):
    """A prompt with no tokens."""


class ContextLengthError(PromptError):
    """A prompt that leaves no room in the model's context for even one new token."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context_length} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class TokenIdError(MmtError):
    """A token id (in a prompt given as ids, or a logit bias) outside the model's vocabulary."""

    def __init__(self, field: str, token: int, vocab_size: int) -> None:
        super().__init__(f"{field} token id {token} is out of the vocabulary (0..{vocab_size}).")
        self.field = field  # "prompt" or "logit_bias": the request field that carried the id
        self.token = token
        self.vocab_size = vocab_size
