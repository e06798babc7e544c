"""The JAX methods: the same DP-SGD step on the flax port of a workload (models/jax), one jitted call.

* ``jax-vmap`` — the whole step as ``jit``: per-example gradients by ``vmap(grad(loss of one example))`` with
  every batch input mapped (x, t, y, ε or tokens and targets: ``in_axes=(None, 0, …, 0)``), flat clipping
  g_i · min(1, C/(‖g_i‖ + 1e-6)), the sum, Gaussian noise N(0, σ²C²) once per batch, the division by B and the
  optax update (AdamW, Adam or SGD with the torch optimizer's hyper-parameters).
* ``jax-privacy`` — the same step with jax-privacy's own pieces: ``jax_privacy.clipped_grad`` (the sum of the
  clipped per-example gradients, by ``vmap`` inside; ``microbatch_size`` chunks the batch sequentially, its only
  memory lever) and ``noise_addition.gaussian_privatizer`` (σC-noise as an optax transformation). The method spec
  ``jax-privacy:microbatch=K`` sets the microbatch size (K must divide the batch, else ``unsupported``).

Both start from the PyTorch model's weights (imported under its parameter names) and, when the step is
closed, write the trained weights back into it, so a fused step reads like every other method's. Their
``clipped_grad_sum`` returns the noise-free clipped sum as torch tensors under the PyTorch names. They train
the full model in fp32 without checkpointing (the only mode the ports have); JAX runs on its default device.
Without the ``jax`` extra, or for a workload with no port, they are ``unsupported`` naming the reason.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bench.trackers.channel import PHASES, PhaseMarker, no_mark

from ._common import CLIP_EPS, model_device, trainable_parameters
from .base import DPMethod, DPStep, StepInputs, register_method
from .errors import DPConfigError, MethodUnsupported, error_text
from .modes import DEFAULT_MODE, TrainingMode

__all__ = ["JAX_EXTRA", "JaxPrivacy", "JaxStep", "JaxVmap", "batch_arrays"]

JAX_EXTRA = "pip install 'dpmem[jax]'"


def _require(method: str, modules: tuple[str, ...]) -> None:
    """MethodUnsupported naming the extra if one of ``modules`` does not import (each imported by name, so a
    module made unimportable in ``sys.modules`` counts as absent)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MethodUnsupported(
                method, error_text(exc), f"the JAX methods need the jax extra: {JAX_EXTRA}"
            ) from exc


def batch_arrays(batch) -> tuple:
    """The batch's inputs and target as JAX arrays (integers as int32: JAX's default without x64)."""
    import jax.numpy as jnp

    def convert(t: Tensor):
        a = t.detach().cpu().numpy()
        return jnp.asarray(a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a)

    return tuple(convert(t) for t in (*batch.inputs, batch.target))


@dataclass(frozen=True)
class _Optimizer:
    """The optax counterpart of a torch optimizer, its hyper-parameters read from its first param group."""

    kind: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def transform(self):
        import optax

        if self.kind == "sgd":
            return optax.sgd(self.lr)
        if self.kind == "adam":
            return optax.adam(self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps)
        return optax.adamw(self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)


def _optimizer_of(method: str, optimizer: torch.optim.Optimizer) -> _Optimizer:
    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.SGD and not group.get("momentum") and not group.get("weight_decay"):
        return _Optimizer("sgd", group["lr"])
    if type(optimizer) is torch.optim.Adam and not group.get("weight_decay"):
        return _Optimizer("adam", group["lr"], tuple(group["betas"]), group["eps"])
    if type(optimizer) is torch.optim.AdamW:
        return _Optimizer("adamw", group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
    raise MethodUnsupported(
        method, f"no optax counterpart for {type(optimizer).__name__} with {group}", "use adamw, adam or plain sgd"
    )


class JaxStep(DPStep):
    """A jitted DP step on the flax port: (params, optimizer state, noise state, batch) -> the same, updated,
    and the mean loss. :meth:`compile` lowers and compiles it once (timed apart: compile time is setup);
    ``__call__`` runs the compiled step; :meth:`close` writes the trained weights back into the torch model."""

    def __init__(self, inputs: StepInputs, method: JaxMethod, *, abstract: bool = False):
        """``abstract``: the state as ShapeDtypeStruct stand-ins (a model on meta): the step can be lowered and
        compiled, never run."""
        super().__init__(inputs)
        import jax
        import optax

        from models.jax import TRAINED, port_for

        self.method, self.abstract = method, abstract
        method.check_batch_size(inputs.batch_size)
        self.port = port_for(inputs.workload, inputs.model)
        variables = self.port.shapes() if abstract else self.port.import_weights(inputs.model)
        self.params = variables.pop(TRAINED)
        self.frozen = variables
        tx = _optimizer_of(method.name, inputs.optimizer).transform()
        self.opt_state = jax.eval_shape(tx.init, self.params) if abstract else tx.init(self.params)
        generator = inputs.noise_generator
        seed = 0 if generator is None else int(torch.randint(0, 2**31 - 1, (), generator=generator))
        std, batch_size = inputs.privacy.noise_multiplier * inputs.privacy.max_grad_norm, inputs.batch_size
        clipped_sum = method.clipped_sum_fn(self.port, inputs.privacy.max_grad_norm)
        add_noise, self.noise_state = method.noise_fn(std, jax.random.key(seed), self.params)

        def step(params, frozen, opt_state, noise_state, *batch):
            summed, losses = clipped_sum(params, frozen, *batch)
            noisy, noise_state = add_noise(summed, noise_state)
            grads = jax.tree_util.tree_map(lambda g: g / batch_size, noisy)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, noise_state, losses.mean()

        # the trained state is donated: XLA may update it in place, as torch's optimizer does
        self._jitted = jax.jit(step, donate_argnums=(0, 2, 3))
        self.compiled = None
        self.compile_s: float | None = None

    def lower(self, *batch):
        """The jitted step lowered for ``batch`` (arrays or ShapeDtypeStruct stand-ins: nothing runs)."""
        return self._jitted.lower(self.params, self.frozen, self.opt_state, self.noise_state, *batch)

    def compile(self, batch) -> None:
        """Compile for ``batch``'s shapes once; ``compile_s`` records how long lowering + compiling took."""
        if self.compiled is None:
            start = time.perf_counter()
            self.compiled = self.lower(*batch_arrays(batch)).compile()
            self.compile_s = time.perf_counter() - start

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        self.compile(batch)
        arrays = batch_arrays(batch)
        mark("forward")
        self.params, self.opt_state, self.noise_state, loss = self.compiled(
            self.params, self.frozen, self.opt_state, self.noise_state, *arrays
        )
        loss.block_until_ready()
        # one fused XLA call: the later phases can only be marked after it
        for phase in PHASES[1:]:
            mark(phase)
        mark("end")
        return torch.tensor(float(loss))

    def close(self) -> None:
        """Write the trained weights back into the torch model (the step trained the port's copy)."""
        from models.jax import export_to_torch

        if self.abstract:
            return
        trained = export_to_torch(self.params)
        with torch.no_grad():
            for name, p in trainable_parameters(self.model).items():
                p.copy_(trained[name].to(p.device, p.dtype))


class JaxMethod(DPMethod):
    """What both JAX methods share: the checks, the fused step, the noise-free clipped sum."""

    requires: tuple[str, ...] = ("jax", "flax", "optax")
    opt_in = True  # the jax extra's: named with --methods jax-vmap,jax-privacy

    def clipped_sum_fn(self, port, max_grad_norm: float) -> Callable:
        """``f(params, frozen, *inputs, target) -> (Σ_i clipped g_i as a params tree, per-example losses (B,))``;
        ``frozen`` holds the port's other collections (the fixed position table)."""
        raise NotImplementedError

    def check_batch_size(self, batch_size: int) -> None:
        """MethodUnsupported for a batch size the method cannot split (jax-privacy's microbatches)."""

    def noise_fn(self, std: float, key, params) -> tuple[Callable, object]:
        """(``add(summed, state) -> (noisy, state)``, its initial state): N(0, std²) on every coordinate."""
        import jax

        def add(summed, key):
            key, sub = jax.random.split(key)
            leaves, tree = jax.tree_util.tree_flatten(summed)
            keys = jax.random.split(sub, len(leaves))
            noisy = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)]
            return jax.tree_util.tree_unflatten(tree, noisy), key

        return add, key

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        _require(self.name, (*self.requires, "models.jax"))
        from models.jax import NoJaxPort, port_for

        try:
            port_for(workload, model)
        except NoJaxPort as exc:
            raise MethodUnsupported(self.name, str(exc), "the JAX methods run the built-in DiT and GPT-2 only") from exc
        if mode != DEFAULT_MODE:
            raise MethodUnsupported(
                self.name,
                f"training mode {mode.label}",
                "the JAX ports train the full model in fp32 without activation checkpointing only",
            )

    def build(self, inputs: StepInputs) -> DPStep:
        return JaxStep(inputs, self)

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        import jax

        from models.jax import TRAINED, export_to_torch, port_for

        self.check_batch_size(batch.batch_size)
        port = port_for(workload, model)
        variables = port.import_weights(model)
        params = variables.pop(TRAINED)
        clipped_sum = jax.jit(self.clipped_sum_fn(port, max_grad_norm))
        summed, _ = clipped_sum(params, variables, *batch_arrays(batch))
        device = model_device(model)
        sums = export_to_torch(summed)
        return {name: sums[name].to(device) for name in trainable_parameters(model)}


def _example_loss(port) -> Callable:
    """loss(params, frozen, *inputs, target) of one example that keeps its batch dim of 1."""

    def loss(params, frozen, *example):
        *inputs, target = example
        output = port.module.apply({"params": params, **frozen}, *inputs)
        return port.loss_per_sample(output, target)[0]

    return loss


@register_method
class JaxVmap(JaxMethod):
    """jit(vmap(grad)) over every batch input, flat clipping, sum, Gaussian noise, optax update."""

    name = "jax-vmap"

    def clipped_sum_fn(self, port, max_grad_norm: float) -> Callable:
        import jax
        import jax.numpy as jnp

        loss = _example_loss(port)

        def one_example(params, frozen, *example):
            # vmap strips the batch dim; the model and the loss expect one of size 1
            return jax.value_and_grad(loss)(params, frozen, *(x[None] for x in example))

        def clipped_sum(params, frozen, *batch):
            in_axes = (None, None) + (0,) * len(batch)  # every batch input mapped, the weights shared
            losses, grads = jax.vmap(one_example, in_axes=in_axes)(params, frozen, *batch)
            squares = [jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree_util.tree_leaves(grads)]
            norms = jnp.sqrt(sum(squares))  # (B,)
            factors = jnp.minimum(1.0, max_grad_norm / (norms + CLIP_EPS))
            return jax.tree_util.tree_map(lambda g: jnp.einsum("i,i...->...", factors, g), grads), losses

        return clipped_sum


@register_method
class JaxPrivacy(JaxMethod):
    """jax_privacy.clipped_grad (optionally microbatched) + gaussian_privatizer + optax update."""

    name = "jax-privacy"
    requires = ("jax", "flax", "optax", "jax_privacy")
    # microbatch_size (DPMethod's): None, all examples vmapped at once; k (the spec jax-privacy:microbatch=k):
    # jax-privacy runs B/k chunks of k in sequence (lax.fori_loop), its only memory lever

    def with_options(self, options: str) -> JaxPrivacy:
        """``microbatch=K`` (K >= 1): the method that vmaps K examples at a time, named by its canonical spec."""
        key, equals, value = options.partition("=")
        if key.strip() != "microbatch" or not equals:
            raise DPConfigError(f"DP method {self.name!r}: bad option {options!r}; valid: microbatch=K (K >= 1)")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise DPConfigError(f"DP method {self.name!r}: microbatch must be an integer >= 1, got {value!r}")
        method = JaxPrivacy()
        method.name, method.microbatch_size = f"{self.name}:microbatch={size}", size
        return method

    def check_batch_size(self, batch_size: int) -> None:
        size = self.microbatch_size
        if size is not None and batch_size % size:
            raise MethodUnsupported(
                self.name,
                f"microbatch size {size} does not divide batch size {batch_size}",
                "jax-privacy reshapes the batch into B/k chunks of k (else its own TypeError: cannot reshape); "
                "pick a microbatch size that divides the batch",
            )

    def clipped_sum_fn(self, port, max_grad_norm: float) -> Callable:
        import jax_privacy

        loss = _example_loss(port)

        def clipped_sum(params, frozen, *batch):
            fn = jax_privacy.clipped_grad(
                loss,
                l2_clip_norm=max_grad_norm,
                batch_argnums=tuple(range(2, len(batch) + 2)),
                microbatch_size=self.microbatch_size,
                return_values=True,
            )
            summed, aux = fn(params, frozen, *batch)
            return summed, aux.values

        return clipped_sum

    def noise_fn(self, std: float, key, params) -> tuple[Callable, object]:
        import jax
        from jax_privacy import noise_addition

        privatizer = noise_addition.gaussian_privatizer(stddev=std, prng_key=key)
        abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(params))
        return privatizer.update, jax.eval_shape(privatizer.init, params) if abstract else privatizer.init(params)
