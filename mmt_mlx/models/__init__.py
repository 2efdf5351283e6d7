"""One module per architecture; each has a ``ModelArgs`` dataclass and a ``Model``."""

from mmt_mlx.models import gemma3, llama

ARCHITECTURES = {"llama": llama, "gemma3": gemma3}
