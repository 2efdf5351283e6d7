import pytest

from mmt_mlx.testing import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Real GGUF files of tiny random models (SmolLM2's tokenizer): {arch: (path, hf_weights)}."""
    root = tmp_path_factory.mktemp("gguf")
    return {arch: (str(root / f"tiny-{arch}.gguf"), write_tiny_gguf(str(root / f"tiny-{arch}.gguf"), arch))
            for arch in ("llama", "gemma3")}  # fmt: skip
