"""Runs mmt_mlx's Metal kernel bodies on the CPU (g++ + metal_compat.h); see harness.py."""
