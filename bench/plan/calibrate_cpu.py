"""The time model's rates on this CPU, measured: a matmul, a copy, a cache-resident elementwise op and a tiny op.

Each is timed a few times and the fastest run kept (the least disturbed by other load), by ``clock``: wall time by
default; ``time.thread_time`` with one torch thread (``torch.set_num_threads(1)``) for figures that other load on
the machine does not inflate (bench/plan/validate_time.py):

* matmul FLOP/s — a float32 n×n×n ``mm`` (2·n³ FLOPs), at torch's intra-op thread count;
* bandwidth — ``copy_`` of a tensor far larger than the caches (its bytes read + written, as the work counter
  counts a copy: input + output);
* elementwise FLOP/s — ``mul`` of cache-resident tensors into a preallocated output (1 FLOP per element);
* launch overhead — an ``add`` of one-element tensors: the fixed cost of dispatching one op.

The attention rate is the matmul rate (CPU attention kernels are matmuls in a loop). bfloat16 on a CPU without
native bf16 arithmetic is not measured; its ops take the float32 rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.plan.timemodel import Roofline

__all__ = ["cpu_roofline"]


def _fastest(run: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    run()  # warm-up: allocations, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def cpu_roofline(
    matmul_n: int = 1024, copy_mib: int = 256, repeats: int = 5, clock: Callable[[], float] = time.perf_counter
) -> Roofline:
    """Measure this machine (about a second) and return its roofline (module docstring)."""
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    matmul = 2 * matmul_n**3 / _fastest(lambda: torch.mm(a, b), repeats, clock)
    source = torch.empty(copy_mib * 2**20 // 4)
    target = torch.empty_like(source)
    bandwidth = 2 * source.nbytes / _fastest(lambda: target.copy_(source), repeats, clock)  # noqa: F821 (bound above)
    del source, target
    x, y = torch.randn(2**15), torch.randn(2**15)
    out = torch.empty_like(x)
    loops = 100
    elementwise = loops * x.numel() / _fastest(lambda: [torch.mul(x, y, out=out) for _ in range(loops)], repeats, clock)
    one = torch.ones(1)
    launch = _fastest(lambda: [one.add(one) for _ in range(1000)], repeats, clock) / 1000
    return Roofline(
        matmul_flops={"float32": matmul},
        attention_flops={"float32": matmul},
        elementwise_flops=elementwise,
        bandwidth=bandwidth,
        launch_s=launch,
        label=f"this CPU, measured ({torch.get_num_threads()} threads)",
        calibrated=True,
    )


if __name__ == "__main__":
    r = cpu_roofline()
    print(
        f"matmul {r.matmul_flops['float32'] / 1e9:.1f} GFLOP/s, elementwise {r.elementwise_flops / 1e9:.2f} GFLOP/s, "
        f"bandwidth {r.bandwidth / 1e9:.1f} GB/s, launch {r.launch_s * 1e6:.1f} µs"
    )
