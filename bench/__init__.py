"""dpmem's benchmark: ``pytest bench/`` runs the case matrix (conftest.py, test_*.py) over folders by role.

    config/    options and their parsers, the nested BenchConfig and presets, command-line conventions
    case/      one case: its spec, the one-process runner, the attention router, the meta device
    dp/        the DP-SGD methods behind one registry, the training modes, the compatibility matrix
    trackers/  what a step is measured with: memory sources, timed rounds, the methods' announcement channel
    ranks/     many-rank cases: the torchrun launcher, the per-rank step, one-rank-of-N prediction
    plan/      capacity: max-batch search, overhead model, GPU catalogue, the planner
    system/    the machine: measurable devices, the facts recorded with every result
    results/   the record type, its files (written and read), the session's terminal summary

Loose modules: ``messages`` (one-line message pieces every layer shares), and two commands that use every
folder: ``gpu_check`` (does the measurement agree with itself on this GPU) and ``multi_gpu`` (one pytest per GPU).
"""
