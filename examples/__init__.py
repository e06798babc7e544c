"""Worked examples; each module can be loaded with ``--workload-module examples.<name>``."""
