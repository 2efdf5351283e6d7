"""Offline FGS encoders (numpy only): fit each level kind to a weight matrix, and the planner that picks the
levels of a tensor. Each kind's module also holds its numpy reference decode, the oracle of the runtime."""
