"""OpenAI-compatible HTTP server (installed as mmt_mlx.server)."""
