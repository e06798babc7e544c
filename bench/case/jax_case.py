"""A bench case of a JAX method (bench/dp/jax_methods.py): the :class:`~bench.case.runner.MeasuredCase` kind for a
step that is one XLA program rather than torch ops.

What it measures, and what it cannot:

* **compile** — the jitted step is lowered and compiled once in ``build`` (``compile_s`` in a note): setup, never
  inside the warm-up's duration or a timed round;
* **time** — the compiled step's rounds by the case's timer, paired with the PyTorch non-DP step of the same
  workload and batch (so ``paired_time_ratio`` is JAX-method time ÷ torch nondp time);
* **memory, predicted** — XLA's ``compiled.memory_analysis()`` of the step: temp + arguments + outputs − aliases
  (buffers the donated state shares with the outputs), in ``peak_tensor_bytes``; the arguments (weights, frozen
  tables, optimizer and noise state, batch) in ``baseline_tensor_bytes``. ``measurement`` is ``"xla-compiled"``:
  the compiler's buffer assignment, which counts every buffer at its full size for the whole program where the
  tensor tracker counts live torch storages over time; the two agree in kind, not to the byte. The tracker's
  breakdown and phases cannot be filled (it never sees a JAX array) and stay empty;
* **memory, measured** — RSS sampled during one call on CPU (the process's whole view, ``peak_rss_bytes``); a GPU
  has no JAX figure here (the JAX build on this machine has no GPU backend: such a case is ``unsupported``).

On the meta device nothing is allocated: the step is lowered with ``ShapeDtypeStruct`` stand-ins for the
weights, state and batch and compiled by XLA-CPU, whose buffer assignment is the figure (a GPU compiler
assigns buffers differently), with no timing and no RSS.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

import models
from bench import dp
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp.jax_methods import JaxPrivacy, JaxStep, batch_arrays
from bench.results.record import StepMemory, StepWork, Timing
from bench.trackers.memory.process import RssSampler
from bench.trackers.timing import StepTimer
from models.contract import check_workload_contract

__all__ = ["MEASUREMENT", "JaxCase", "JaxFacts", "XlaBytes", "is_jax_method", "xla_bytes"]

MEASUREMENT = "xla-compiled"


def is_jax_method(method: str) -> bool:
    return isinstance(dp.get_method(method), dp.jax_methods.JaxMethod)


@dataclasses.dataclass(frozen=True)
class XlaBytes:
    """XLA's compiled memory analysis of one program, in bytes."""

    temp: int
    arguments: int
    outputs: int
    aliases: int

    @property
    def total(self) -> int:
        """What the program holds at once by XLA's buffer assignment: temp + arguments + outputs − aliases."""
        return self.temp + self.arguments + self.outputs - self.aliases


def xla_bytes(compiled) -> XlaBytes:
    analysis = compiled.memory_analysis()
    return XlaBytes(
        int(analysis.temp_size_in_bytes),
        int(analysis.argument_size_in_bytes),
        int(analysis.output_size_in_bytes),
        int(analysis.alias_size_in_bytes),
    )


class JaxCase:
    """A JAX method's case on a CPU (real arrays) or on meta (stand-ins, compile only); see the module docstring.
    ``reference(batch, notes)`` builds the PyTorch non-DP step its timed rounds are paired with."""

    measurement = MEASUREMENT

    def __init__(
        self,
        spec: CaseSpec,
        config: BenchConfig,
        workload,
        device: torch.device,
        timer: StepTimer | None,
        reference: Callable | None = None,
    ):
        self.spec, self.config, self.workload, self.device, self.timer = spec, config, workload, device, timer
        self.reference_factory = reference
        self.resident = device.type != "meta"
        self.batch_text = f"batch {spec.batch_size}"
        self.op_cache = None
        self.facts = JaxFacts()
        self.work = StepWork()  # XLA runs no torch ops: nothing to count
        self.kernels: list[str] = []
        self.first_notes: tuple[str, ...] = ()  # the runner reads them before build: the setup's come in measure
        self.setup_notes: tuple[str, ...] = ()
        self.step: JaxStep | None = None
        self.batch = self.reference = None

    def context(self) -> AbstractContextManager:
        return nullcontext()

    def build(self) -> None:
        import jax

        spec, config, workload, device = self.spec, self.config, self.workload, self.device
        method = dp.get_method(spec.method)
        model = workload.build_model("meta" if device.type == "meta" else "cpu")
        check_workload_contract(workload, model, next(model.parameters()).device)
        method.check(workload, model, spec.mode)
        backend = jax.default_backend()
        if device.type == "cuda" and backend != "gpu":
            raise dp.MethodUnsupported(
                spec.method,
                f"jax has no GPU backend in this environment (jax.default_backend() is {backend!r})",
                "install jax with CUDA support (pip install 'jax[cuda12]') to run the JAX methods on a GPU",
            )
        self.facts.params_total, self.facts.params_trainable = models.parameter_counts(model)
        abstract = device.type == "meta"
        generator = torch.Generator().manual_seed(config.step.seed)
        self.batch = workload.make_batch(spec.batch_size, generator=generator)  # drawn on CPU: JAX takes numpy
        optimizer = dp.make_optimizer(config.step.optimizer, [torch.nn.Parameter(torch.empty(0))])
        noise = None if abstract else torch.Generator().manual_seed(config.step.seed + 1)
        inputs = dp.StepInputs(workload, model, optimizer, config.step.privacy, spec.batch_size, noise, spec.mode)
        self.step = JaxStep(inputs, method, abstract=abstract)
        arrays = batch_arrays(self.batch)
        start = time.perf_counter()
        if abstract:
            stand_ins = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
            self.step.compiled = self.step.lower(*stand_ins).compile()
            self.step.compile_s = time.perf_counter() - start
        else:
            self.step.compile(self.batch)
        where = "XLA-CPU's buffer assignment, not a GPU's" if abstract else f"XLA-{backend.upper()}"
        self.setup_notes = (
            f"jax: step compiled in {self.step.compile_s:.2f} s (setup: not in any timed round)",
            f"jax: memory = XLA compiled memory_analysis ({where}): temp + arguments + outputs - aliases, predicted; "
            "the tensor tracker's breakdown and phases do not apply (it sees no JAX array)",
            *([f"jax-privacy microbatch_size: {method.microbatch_size}"] * isinstance(method, JaxPrivacy)),
            *(
                ("meta device: lowered with ShapeDtypeStruct stand-ins, nothing allocated; no timing, no RSS",)
                * abstract
            ),
        )

    def warm_up(self) -> float:
        if not self.resident:
            return 0.0
        start = time.perf_counter()
        self.step(self.batch)
        return time.perf_counter() - start

    def measure(self, nvml_baseline_bytes: int | None, notes: list[str]) -> StepMemory:
        analysis = xla_bytes(self.step.compiled)
        notes.extend(self.setup_notes)
        notes.append(
            f"xla: temp {analysis.temp} B, arguments {analysis.arguments} B, outputs {analysis.outputs} B, "
            f"aliases {analysis.aliases} B"
        )
        memory = StepMemory(peak_tensor_bytes=analysis.total, baseline_tensor_bytes=analysis.arguments)
        if not self.resident:
            return memory
        sampler = RssSampler(self.config.measure.sample_interval_s)
        sampler.start()
        try:
            self.step(self.batch)
        finally:
            rss = sampler.stop()
        notes.extend(rss.notes)
        memory.peak_rss_bytes, memory.baseline_rss_bytes = rss.peak_rss_bytes, rss.baseline_rss_bytes
        return memory

    def time(self, one_call_s: float, notes: list[str]) -> Timing:
        if self.timer is None or not self.resident:
            return Timing()
        step, batch = self.step, self.batch
        if self.reference_factory is not None:
            self.reference = self.reference_factory(batch, notes)
        return self.timer(lambda: step(batch), one_call_s, self.reference, notes)

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
        self.step = self.batch = self.reference = None


@dataclasses.dataclass
class JaxFacts:
    """What the record takes from a case's model (the fields of the runner's ModelFacts)."""

    params_total: int | None = None
    params_trainable: int | None = None
    dtype: str = "float32"
    optimizer_impl: str | None = "optax"
