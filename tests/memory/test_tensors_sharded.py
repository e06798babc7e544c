"""The tensor tracker on what FSDP2 does: storages resized outside dispatch, DTensors, FakeTensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bench.trackers.memory.tensors import TensorTracker


def test_a_storage_resized_outside_dispatch_is_allocated_and_freed_in_the_log():
    """FSDP2 makes its unsharded parameters with ``UntypedStorage.resize_`` (no aten op): grown from empty it is
    an allocation, shrunk to 0 a free."""
    declared = torch.zeros(64)  # 256 bytes before the step
    unsharded = torch.empty(0)  # storage of 0 bytes, as FSDP2 leaves a freed unsharded parameter
    tracker = TensorTracker("cpu")
    tracker.register_state(extra=[declared])
    with tracker:
        tracker.mark("forward")
        unsharded.untyped_storage().resize_(1024)  # +1024 (all-gathered)
        activation = declared * 2  # +256
        unsharded.untyped_storage().resize_(0)  # -1024 (resharded)
        tracker.mark("backward")
        del activation
    report = tracker.report()
    assert report.baseline_tensor_bytes == 256
    assert report.peak_tensor_bytes == 256 + 1024 + 256
    assert report.breakdown["activations"] == 1024 + 256  # both appeared in the forward
    assert torch.UntypedStorage.resize_ is torch._C.StorageBase.resize_  # unwrapped once the tracker left


def test_a_known_storage_grown_outside_dispatch_counts_its_growth():
    kept = torch.zeros(16)  # 64 bytes
    tracker = TensorTracker("cpu")
    tracker.register_state(extra=[kept])
    with tracker:
        kept.untyped_storage().resize_(640)
    assert tracker.report().peak_tensor_bytes == 640


@pytest.fixture
def two_rank_mesh():
    """Rank 0 of a fake 2-rank world in this process (collectives do nothing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def test_a_dtensor_counts_its_local_shard_not_the_global_tensor(two_rank_mesh):
    from torch.distributed.tensor import DTensor, Shard

    shard = DTensor.from_local(torch.zeros(8, 4), two_rank_mesh, [Shard(0)])  # global (16, 4): 256 bytes
    assert shard.untyped_storage().nbytes() == 256  # DTensor's own storage: a placeholder of the global size
    tracker = TensorTracker("cpu")
    tracker.register_state(extra=[shard])
    with tracker:
        doubled = shard * 2  # a new local shard: +128
    report = tracker.report()
    assert report.baseline_tensor_bytes == 128 and report.peak_tensor_bytes == 256
    assert doubled.to_local().shape == (8, 4)


def test_fake_tensors_resized_outside_dispatch_are_counted():
    """FakeTensors report the cpu device but keep their bytes in meta storages; a resize is matched by those."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        declared = torch.zeros(32)  # 128 bytes
        tracker = TensorTracker("cpu")
        tracker.register_state(extra=[declared])
        with tracker:
            grown = declared.new_empty(0)
            grown.untyped_storage().resize_(4096)
            grown.untyped_storage().resize_(0)
    report = tracker.report()
    assert report.baseline_tensor_bytes == 128 and report.peak_tensor_bytes == 128 + 4096
