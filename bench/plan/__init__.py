"""Capacity: how much fits where — the max-batch search, the overhead model beyond tensor bytes, the GPU
catalogue, and the planner (``python -m bench.plan``) that combines them before a GPU is rented."""
