"""Quality beside size: KL divergence against the dense model, and the bytes-vs-perplexity frontier.

``mmt eval kl`` compares the next-token distributions of a candidate (the FGS model by default) with the dense
(dequantized source) model on a text. ``mmt eval frontier`` converts the model at several presets, quantizes it
with MLX at several bit widths, and plots stored bytes against perplexity (the same chunking rule as
``mmt eval ppl``: BOS + ctx-1 tokens per chunk, every token after BOS scored).
"""
