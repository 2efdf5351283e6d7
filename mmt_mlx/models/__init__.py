"""One module per architecture: a ``ModelArgs`` dataclass, a ``Model``, and the checkpoint rules (GGUF and
Hugging Face names, config keys, quirks) beside them. ``ARCHITECTURES`` is the one list of what is supported,
keyed by the GGUF ``general.architecture`` name."""

from mmt_mlx.models import gemma3, llama

ARCHITECTURES = {"llama": llama, "gemma3": gemma3}
HF_MODEL_TYPES = {t: arch for arch, module in ARCHITECTURES.items() for t in module.HF_MODEL_TYPES}
