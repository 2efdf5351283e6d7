"""``mmt bench``: llama-bench style speed of the FGS model beside its comparison set, in one run and backend.

Per variant: prompt processing (ppN) and generation (tgN) tokens/s as mean and sample std over repetitions
after a warm-up, peak MLX memory, stored weight bytes, bytes read per generated token, the bandwidth that
implies, and an Apple Silicon estimate from bytes and FLOPs per token. Variants: the FGS model, the dense
model (dequantized source), MLX's 8- and 4-bit quantization of the dense model (group 64), and llama.cpp on the
source GGUF when llama-cpp-python is installed. The FGS model and llama.cpp take their repetitions in turn
(prompt passes, then decodes, round by round), so that the ratio between them does not depend on how this
host's speed drifted between the two; the other variants run one after another.

Bytes per token counts every weight a decode step reads, at its stored size: FGS codes as stored; dense
arrays as held (f32 on CPU); MLX quantized weights packed with half-precision scales and biases (as MLX saves
them); the embedding lookup reads one row; a tied LM head reads the whole table.
"""
