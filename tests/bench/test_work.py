"""Work counts (bench/trackers/work.py) checked against arithmetic, on tiny configs, on meta where shapes suffice.

The formulas, for a GPT of L blocks of width D at T tokens and batch B:

* N = the matmul parameters (bench's GPT: 12·D² per block — qkv 3D², proj D², MLP 8D² — plus the lm_head's
  D·V; the embeddings are lookups, no matmul; biases are added inside addmm, not counted by torch's formula);
* matmuls: 2·N·T·B forward, 4·N·T·B backward (input and weight gradients; every block's input needs its
  gradient since the embeddings train): 6·N·T·B;
* attention per block, B·H·T²·(D/H) products of 2 FLOPs: the efficient kernel 4·B·T²·D forward (Q·Kᵀ, P·V)
  and 10·B·T²·D backward (the scores recomputed + four gradient products): 14·B·T²·D; the math kernel is bmm
  ops, 4·B·T²·D forward and 8·B·T²·D backward, counted as matmuls.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import models
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.results.record import OP_CLASSES, CaseRecord, StepWork
from bench.trackers.work import WorkCounter, op_work
from models import Batch, Workload
from models.catalog import TINY_GPT
from tests.bench.test_meta import _config as meta_config

aten = torch.ops.aten


def _config(**overrides) -> BenchConfig:
    fields = dict(attention="efficient", optimizer_impl="foreach", sample_interval_s=0.5) | overrides
    return meta_config(**fields)


def _work(workload: str, method: str, batch: int, device: str = "meta", **config) -> StepWork:
    record = run_case(CaseSpec(workload, method, batch, device), _config(**config), None)
    assert record.status == "ok", record.reason
    return record.work


def _gpt_formula(batch: int, tokens: int, n_layer: int, width: int, vocab: int) -> tuple[int, int]:
    """(6·N·T·B, attention FLOPs of the efficient kernel) for the module docstring's N."""
    n = 12 * width * width * n_layer + width * vocab
    return 6 * n * tokens * batch, 14 * batch * tokens * tokens * width * n_layer


def test_nondp_gpt_matmuls_and_attention_are_6NTB_and_14BT2D_per_layer_exactly():
    cfg, batch = TINY_GPT, 4
    matmul, attention = _gpt_formula(batch, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.vocab_size)
    work = _work("gpt-tiny", "nondp", batch)
    assert work.flops_by_class["matmul"] == matmul
    assert work.flops_by_class["attention"] == attention
    # the math kernel: its bmm ops are matmuls, 12·B·T²·D per block
    math = _work("gpt-tiny", "nondp", batch, attention="math")
    assert "attention" not in math.flops_by_class
    assert math.flops_by_class["matmul"] == matmul + attention * 12 // 14


def test_nondp_gpt2_total_flops_are_the_formula_within_2_percent():
    """Every op counted (elementwise, reductions, the optimizer) against 6·N·T·B + attention, at GPT-2 width."""
    batch, tokens, n_layer = 2, 128, 2
    matmul, attention = _gpt_formula(batch, tokens, n_layer, 768, 50257)
    work = _work(f"gpt2:seq_len={tokens}:n_layer={n_layer}", "nondp", batch)
    assert work.flops_by_class["matmul"] == matmul
    assert work.flops == pytest.approx(matmul + attention, rel=0.02)
    assert work.flops == sum(work.flops_by_class.values()) == sum(work.flops_by_phase.values())
    assert work.bytes_accessed == sum(work.bytes_by_class.values()) == sum(work.bytes_by_phase.values())
    assert work.op_count == sum(g.count for g in work.op_groups) == sum(work.ops_by_class.values())
    assert work.flops == sum(g.flops * g.count for g in work.op_groups)


IN, OUT, TOKENS = 32, 48, 8  # 2·T² < IN·OUT: Book-Keeping takes the ghost norm


@pytest.fixture()
def one_linear(monkeypatch):
    """A bring-your-own workload: one bias-free Linear on B×T×IN inputs."""

    def batch(size: int, generator: torch.Generator) -> Batch:
        return Batch(inputs=(torch.randn(size, TOKENS, IN, generator=generator),), target=torch.zeros(size))

    models.list_workloads()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    workload = Workload(
        name="one-linear",
        model_fn=lambda: nn.Linear(IN, OUT, bias=False),
        batch_fn=batch,
        loss_fn=lambda out, target: out.pow(2).mean(dim=(1, 2)),
        tokens_per_sample=TOKENS,
    )
    return models.register_workload(workload)


@pytest.mark.parametrize("method", ["bk", "bk-tiled"])
def test_book_keeping_adds_exactly_the_ghost_norm_grams_of_a_linear(one_linear, method):
    batch = 3
    nondp, bk = _work(one_linear, "nondp", batch), _work(one_linear, method, batch)
    grams = 2 * batch * TOKENS**2 * (IN + OUT)  # A·Aᵀ and G·Gᵀ per sample
    assert bk.flops_by_class["matmul"] - nondp.flops_by_class["matmul"] == grams


def test_opacus_ghost_runs_one_more_backward(one_linear):
    """Its second backward repeats the weight-gradient matmul (nondp's backward matmuls: 2·B·T·IN·OUT) beside
    the norm's Grams; the rest of the difference (the Grams' inner product) is within 2 %."""
    batch = 3
    nondp, ghost = _work(one_linear, "nondp", batch), _work(one_linear, "opacus-ghost", batch)
    backward = 2 * batch * TOKENS * IN * OUT
    assert nondp.flops_by_class["matmul"] == 2 * backward  # forward + backward, as many FLOPs each
    grams = 2 * batch * TOKENS**2 * (IN + OUT)
    assert ghost.flops_by_class["matmul"] == pytest.approx(nondp.flops_by_class["matmul"] + backward + grams, rel=0.02)


def test_the_per_sample_loop_is_B_one_sample_passes():
    """microbatch at B: its forward and backward phases are exactly B times its one-sample step's (FLOPs, bytes,
    ops); its matmuls B times nondp's at batch 1 (no matmul outside forward and backward). Noise and optimizer
    do not depend on B."""
    batch = 3
    one, loop = _work("gpt-tiny-untied", "microbatch", 1), _work("gpt-tiny-untied", "microbatch", batch)
    for phase in ("forward", "backward"):
        assert loop.flops_by_phase[phase] == batch * one.flops_by_phase[phase]
        assert loop.bytes_by_phase[phase] == batch * one.bytes_by_phase[phase]
    for phase in ("noise", "optimizer"):
        assert loop.flops_by_phase[phase] == one.flops_by_phase[phase]
    assert loop.flops_by_class["matmul"] == batch * _work("gpt-tiny-untied", "nondp", 1).flops_by_class["matmul"]


def test_vmapped_ops_are_counted_as_the_batched_ops():
    """torch.func's vmap reaches dispatch as one batched op per op: as many ops at batch 4 as at batch 2, the
    matmul FLOPs twice as many (math attention: every op has a batching rule; at batch 1 functorch takes other
    paths). An op without a batching rule runs functorch's fallback, a loop over the samples, and is counted as
    the B ops it is: the efficient attention backward, one per sample and block beside one forward per block."""
    two, four = (_work("gpt-tiny", "torch-func", b, attention="math") for b in (2, 4))
    assert four.op_count == two.op_count
    assert four.flops_by_class["matmul"] == 2 * two.flops_by_class["matmul"]
    for batch in (2, 4):
        work = _work("gpt-tiny", "torch-func", batch)
        assert work.ops_by_class["attention"] == TINY_GPT.n_layer * (1 + batch)


@pytest.mark.parametrize("method", ["nondp", "bk", "opacus-hooks", "torch-func", "microbatch"])
def test_meta_counts_equal_cpu_counts(method):
    """The same ops on both devices (math attention and the for-loop optimizer on both): the same counts."""
    config = dict(attention="math", optimizer_impl="for-loop")
    cpu, meta = (_work("gpt-tiny-untied", method, 2, device, **config) for device in ("cpu", "meta"))
    assert cpu == meta
    assert cpu.flops > 0 and set(cpu.flops_by_class) <= set(OP_CLASSES)


def _copy_ops_by_bytes(work: StepWork) -> Counter:
    """How many copy ops moved each number of bytes, whatever their dtype."""
    found: Counter = Counter()
    for group in work.op_groups:
        if group.op_class == "copy":
            found[group.bytes_accessed] += group.count
    return found


def test_opacus_ghost_on_meta_differs_from_cpu_only_where_the_ops_do():
    """opacus-ghost runs two sets of ops that differ by device, neither in the counting:

    * its optimizer keeps the clipped gradient sum as ``copy.deepcopy(p.grad.data)``
      (opacus/optimizers/optimizer_fast_gradient_clipping.py), and torch's ``Tensor.__deepcopy__`` clones a meta
      tensor but copies a CPU or CUDA tensor's storage as bytes: one ``copy_`` of a uint8 view, then ``set_``
      onto the new storage (no kernel, not an op). The same bytes move and the same number of ops run; the
      copies' dtype reads uint8 on CPU and float32 on meta (a copy's roofline term is its bytes either way);
    * Opacus' embedding norm (opacus/grad_sample/embedding_norm_sample.py) builds ``torch.arange(nrows)`` on the
      CPU and moves it ``.to(device)``: nothing on CPU, a host-to-device copy of B int64 on meta — as on a GPU —
      once per ``nn.Embedding`` (gpt's wte and wpe).

    Every FLOP, every non-copy op and every copy's bytes agree otherwise."""
    batch = 2
    config = dict(attention="math", optimizer_impl="for-loop")
    cpu, meta = (_work("gpt-tiny-untied", "opacus-ghost", batch, device, **config) for device in ("cpu", "meta"))
    assert cpu.flops == meta.flops and cpu.flops_by_phase == meta.flops_by_phase
    assert cpu.flops_by_class == meta.flops_by_class
    not_copies = [[g for g in w.op_groups if g.op_class != "copy"] for w in (cpu, meta)]
    assert not_copies[0] == not_copies[1]

    cpu_copies, meta_copies = (_copy_ops_by_bytes(w) for w in (cpu, meta))
    arange_to_device = 2 * 8 * batch  # int64 in, int64 out
    assert meta_copies - cpu_copies == Counter({arange_to_device: 2}) and not cpu_copies - meta_copies
    assert meta.bytes_by_phase == cpu.bytes_by_phase | {
        "backward": cpu.bytes_by_phase["backward"] + 2 * arange_to_device
    }
    assert meta.op_count == cpu.op_count + 2
    assert {g.dtype for g in cpu.op_groups if g.op_class == "copy"} - {g.dtype for g in meta.op_groups} == {"uint8"}


def test_op_rules():
    """A matmul by torch's formula, a view no op, bytes of a broadcast input counted once, an in-place foreach
    op by what it wrote, a reduction per element read, a copy 0 FLOPs."""
    a, b = torch.empty(4, 5, device="meta"), torch.empty(5, 6, device="meta")
    assert op_work(aten.mm.default, (a, b), {}, torch.mm(a, b)) == ("matmul", "float32", 2 * 4 * 5 * 6, 4 * 74)
    assert op_work(aten.t.default, (a,), {}, a.t()) is None
    row = torch.empty(5, device="meta").expand(4, 5)
    assert op_work(aten.add.Tensor, (a, row), {}, a + row) == ("elementwise", "float32", 20, 4 * (20 + 5 + 20))
    xs = [torch.empty(3, device="meta"), torch.empty(7, device="meta")]
    assert op_work(aten._foreach_mul_.Scalar, (xs, 2.0), {}, None) == ("elementwise", "float32", 10, 4 * 20)
    assert op_work(aten.sum.default, (a,), {}, a.sum()) == ("elementwise", "float32", 20, 4 * 21)
    assert op_work(aten.clone.default, (a,), {}, a.clone()) == ("copy", "float32", 0, 4 * 40)
    # a write-only destination counts once: copy_ moves what clone moves, zero_ writes its list once
    target = torch.empty(4, 5, device="meta")
    assert op_work(aten.copy_.default, (target, a), {}, target.copy_(a)) == ("copy", "float32", 0, 4 * 40)
    assert op_work(aten._foreach_zero_.default, (xs,), {}, None) == ("copy", "float32", 0, 4 * 10)
    assert op_work(aten.add_.Tensor, (target, a), {}, target.add_(a)) == ("elementwise", "float32", 20, 4 * 60)
    assert op_work(aten.set_.source_Storage, (a, target.untyped_storage()), {}, a) is None  # re-pointing: no op


def test_counter_phases_and_groups():
    counter, marks = WorkCounter(), []
    a = torch.ones(8, 8)
    with counter:
        mark = counter.marker(marks.append)
        (a @ a).sum()
        mark("forward")
        for _ in range(3):
            a @ a
        mark("end")
        a + 1
    work = counter.work()
    assert marks == ["forward", "end"]
    assert work.flops_by_phase == {"forward": 3 * 1024, "outside": 1024 + 64 + 64}
    matmuls = [g for g in work.op_groups if g.op_class == "matmul"]
    assert [(g.flops, g.count) for g in matmuls] == [(1024, 4)]


def test_records_without_work_still_load():
    data = CaseRecord("gpt-tiny", "nondp", 2, "cpu").to_dict()
    for key in [f for f in data if f in StepWork.__dataclass_fields__]:
        del data[key]
    assert CaseRecord.from_dict(data).work == StepWork()
