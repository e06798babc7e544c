"""Integer tensors that keep their values on meta (bench/case/meta_values.py): true results for value-dependent ops
on them, plain meta for everything a float touches, and tensor bytes counted as the CPU counts them."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from torch import nn

import bench.case.meta_values as meta_values
from bench.case.meta_device import ValuedOpCache
from bench.case.meta_values import IntegerValuesMode, ValuedMetaTensor
from tests.memory.tracking import tracked


def _ids(seed: int = 0, shape=(4, 6), high: int = 5) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def test_an_integer_tensor_moved_to_meta_keeps_its_values_and_a_float_does_not():
    ids = _ids()
    with IntegerValuesMode():
        on_meta, floats = ids.to("meta"), torch.randn(3).to("meta")
        positions = torch.arange(6, device="meta")
        zeros = torch.zeros(2, 3, device="meta")
        token_types = torch.zeros(2, 3, dtype=torch.long, device="meta")
        mask = torch.ones(3, 3, dtype=torch.bool, device="meta")  # a causal mask's start: no values needed
        labels_seen = torch.tensor([True, False]).to("meta")
    assert isinstance(on_meta, ValuedMetaTensor) and on_meta.device.type == "meta"
    assert torch.equal(on_meta.host_values, ids) and on_meta.host_values is not ids  # a copy, as .to makes one
    assert type(floats) is torch.Tensor and type(zeros) is torch.Tensor
    assert isinstance(positions, ValuedMetaTensor) and positions.tolist() == list(range(6))
    assert isinstance(token_types, ValuedMetaTensor) and token_types.tolist() == [[0, 0, 0]] * 2
    assert type(mask) is torch.Tensor and labels_seen.tolist() == [True, False]


def test_value_dependent_ops_on_ids_get_the_cpu_results():
    ids = _ids()
    with IntegerValuesMode():
        on_meta = ids.to("meta")
    rows = torch.arange(4).repeat_interleave(6).unsqueeze(-1)
    pairs = torch.cat([rows, ids.view(-1, 1)], dim=1)
    with IntegerValuesMode():
        meta_pairs = torch.cat([rows.to("meta"), on_meta.view(-1, 1)], dim=1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True, sorted=True)
    meta_unique, meta_inverse = torch.unique(meta_pairs, dim=0, return_inverse=True, sorted=True)
    assert meta_unique.shape == unique.shape and torch.equal(meta_unique.host_values, unique)
    assert torch.equal(meta_inverse.host_values, inverse)
    assert meta_unique.untyped_storage().nbytes() == unique.untyped_storage().nbytes()
    assert on_meta.max().item() == ids.max().item() and bool(on_meta[0, 0] == ids[0, 0])
    assert torch.equal(on_meta.nonzero().host_values, ids.nonzero())
    assert torch.equal(on_meta[on_meta > 2].host_values, ids[ids > 2])
    assert on_meta.tolist() == ids.tolist() and torch.equal(on_meta.cpu(), ids)


def test_a_view_shares_its_base_meta_storage_and_values():
    with IntegerValuesMode():
        on_meta = _ids().to("meta")
    row = on_meta[1]
    assert isinstance(row, ValuedMetaTensor) and row.untyped_storage() is on_meta.untyped_storage()
    row.add_(10)  # through the view: the base's values change too
    assert on_meta.max().item() >= 10 and on_meta[1].min().item() >= 10


def test_floats_stay_plain_meta_and_value_dependent_ops_on_them_still_fail():
    with IntegerValuesMode():
        on_meta = _ids().to("meta")
    as_float = on_meta.float()
    assert type(as_float) is torch.Tensor and as_float.device.type == "meta"
    activations = torch.empty(4, 6, device="meta")
    assert type(activations * on_meta) is torch.Tensor
    with pytest.raises(NotImplementedError, match="data-independent implementation does not exist"):
        as_float.nonzero()
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        (activations * on_meta).sum().item()


def test_writing_an_unknown_value_into_ids_forgets_their_values_and_their_views():
    with IntegerValuesMode():
        on_meta = _ids().to("meta")
    view = on_meta.view(-1)
    on_meta.add_(torch.empty(4, 6, dtype=torch.long, device="meta"))  # a plain meta int: no values
    assert not on_meta.known and not view.known
    with pytest.raises(NotImplementedError, match="Meta tensors"):
        torch.unique(view)
    with IntegerValuesMode():
        again = _ids().to("meta")
    again.random_(0, 5)  # a draw of the device's generator, not a value the host can know
    assert not again.known
    assert type(torch.randint_like(_ids().to("meta"), 5)) is torch.Tensor


def test_large_integer_results_drop_their_values(monkeypatch):
    monkeypatch.setattr(meta_values, "MAX_VALUED_BYTES", 24 * 8)
    with IntegerValuesMode():
        on_meta = _ids().to("meta")  # 24 int64: kept
        too_many = torch.arange(25, device="meta")
    assert isinstance(on_meta, ValuedMetaTensor) and type(too_many) is torch.Tensor
    expanded = on_meta.unsqueeze(-1).expand(4, 6, 2)  # a view of 48 elements holds no more bytes: kept
    wide = expanded.reshape(4, 12)  # a copy of 48 elements: plain
    assert isinstance(expanded, ValuedMetaTensor) and type(wide) is torch.Tensor and wide.shape == (4, 12)
    assert on_meta.known and expanded.known  # the values of the inputs are untouched


def test_a_deep_copy_keeps_the_values():
    with IntegerValuesMode():
        on_meta = _ids().to("meta")
    twin = copy.deepcopy(on_meta)
    assert isinstance(twin, ValuedMetaTensor) and twin.untyped_storage() is not on_meta.untyped_storage()
    assert torch.equal(twin.host_values, on_meta.host_values)
    module = nn.Module()
    module.register_buffer("ids", on_meta)
    assert torch.equal(copy.deepcopy(module).ids.host_values, on_meta.host_values)


def test_the_op_cache_never_caches_an_op_on_valued_tensors():
    results = []
    with ValuedOpCache():
        for seed in (0, 1, 2):
            on_meta = _ids(seed, shape=(40,), high=40).to("meta")
            shifted = on_meta + 1  # a cacheable op on plain meta tensors of this layout
            results.append((torch.unique(shifted).shape[0], shifted.host_values))
    for seed, (count, values) in zip((0, 1, 2), results, strict=True):
        ids = _ids(seed, shape=(40,), high=40)
        assert count == torch.unique(ids).shape[0] and torch.equal(values, ids + 1)
    assert len({count for count, _ in results}) > 1  # the seeds give different shapes: no cached layout


def _ghost_embedding_norm_report(device: str):
    """Opacus' ghost norm of an nn.Embedding (torch.unique of the (sample, id) pairs) under the tensor tracker."""
    ids = _ids(3, shape=(5, 7), high=9)
    layer = nn.Embedding(9, 16)
    backprops = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(4))
    if device == "meta":
        layer = layer.to("meta")
        ids, backprops = ids.to("meta"), backprops.to("meta")
    norms = []

    def run(mark):
        mark("clip")
        norms.append(compute_embedding_norm_sample(layer, [ids], backprops)[layer.weight])

    return tracked(run, device=device, model=layer), norms[0]


def test_the_tracker_counts_the_ghost_embedding_norm_on_meta_as_on_cpu():
    cpu, cpu_norms = _ghost_embedding_norm_report("cpu")
    with ValuedOpCache():
        meta, meta_norms = _ghost_embedding_norm_report("meta")
    assert type(meta_norms) is torch.Tensor and meta_norms.shape == cpu_norms.shape  # a float: plain meta
    assert meta.trace_bytes == cpu.trace_bytes and meta.allocations == cpu.allocations > 5
    assert (meta.peak_tensor_bytes, meta.baseline_tensor_bytes, meta.breakdown, meta.peak_phase) == (
        cpu.peak_tensor_bytes,
        cpu.baseline_tensor_bytes,
        cpu.breakdown,
        cpu.peak_phase,
    )
