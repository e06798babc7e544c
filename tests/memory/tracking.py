"""Drive the tensor tracker in a test as bench.trackers.memory.measure drives it."""

from __future__ import annotations

from bench.trackers.memory.tensors import TensorReport, TensorTracker


def tracked(run, device="cpu", model=None, optimizer=None) -> TensorReport:
    """One ``run(mark)`` under a tensor tracker that knows ``model`` and ``optimizer`` as the step's state."""
    tracker = TensorTracker(device)
    tracker.register_state(model, optimizer)
    with tracker:
        run(tracker.mark)
    return tracker.report()
