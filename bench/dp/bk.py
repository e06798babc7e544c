"""Book-Keeping DP-SGD (Bu, Wang, Zha & Karypis, ICML 2023), our own implementation on PyTorch hooks.

One forward and *one* backward pass per step:

1. forward hooks on every module that directly owns a trainable parameter keep the module's input ``A``
   (detached: the same storage autograd already saves) and a :class:`~torch.autograd.graph.GradientEdge` to its
   output (an edge, not the tensor, so a large output such as GPT's logits is not kept alive by us);
2. one ``torch.autograd.grad(Σ_i loss_i, output edges)`` gives ``G = ∂loss_i/∂output`` per sample — autograd is
   never asked for parameter gradients, so it skips the weight-gradient matmuls and never allocates ``p.grad``;
3. per layer, per-sample squared norms by the **ghost norm** ⟨A Aᵀ, G Gᵀ⟩ or by **instantiating** the per-sample
   gradient — the mixed rule: ghost when 2T² < rows·cols (``norm_mode`` can force either); ``bk-tiled`` forms
   the ghost Grams over (tile × tile) blocks so no B×T×T tensor exists;
4. a parameter used several times (GPT-2's tied wte/lm_head, a module called twice) gets the norm of the *sum*
   of its uses, cross terms included (see ``bk_layers/factors.py``);
5. C_i = min(1, C/(‖g_i‖+1e-6)) and the clipped sum Σ_i C_i g_i per parameter by one matmul / index_add
   (a weighted sum of the per-sample gradients where those were instantiated).

Training modes (bench/dp/modes.py): the forward runs under the mode's autocast, so a layer's kept input A and its
output gradient G can differ in dtype (fp32 input, bf16 output gradient): every product of the two is taken in
their common dtype widened to the parameter's, and every Gram and norm is accumulated in float32 (a 16-bit Gram
would round each entry to 8 or 11 bits, an fp16 one of a loss-scaled G overflows). With a loss scale the backward
runs on the scaled loss and the norms are divided back before clipping. Under activation checkpointing a block's
layers run again in the backward (the recompute); the hooks record each layer call of the forward only, so every
layer is seen once per step, its G taken at the output of the forward's call — the graph the loss hangs from.

Public API: :func:`supported_layers`, :class:`BookKeeping` (``run(...) -> BKResult``), :class:`BKStep`, and the
registered methods ``bk`` (:class:`BKMethod`) and ``bk-tiled`` (:class:`BKTiledMethod`, ``tile_size`` = 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from bench.trackers.channel import PhaseMarker, annotate_dp_buffer, no_mark
from models.checkpointing import checkpoint_pass

from ._common import (
    checked_per_sample_losses,
    clip_factors,
    model_device,
    scaled,
    trainable_parameters,
    unscaled,
)
from .base import ClippedSumMethod, ClippedSumStep, StepInputs, register_method
from .bk_layers import Factored, Instantiated, LayerRule, factored_inner, instantiated_inner, rule_for, supported_types
from .errors import MethodUnsupported
from .modes import DEFAULT_MODE, TrainingMode

__all__ = ["NORM_MODES", "BKMethod", "BKResult", "BKStep", "BKTiledMethod", "BookKeeping", "supported_layers"]

NORM_MODES = ("mixed", "ghost", "instantiate")
DEFAULT_TILE_SIZE = 256


def _module_label(name: str, module: nn.Module) -> str:
    return f"'{name or '<root>'}' ({type(module).__name__})"


def supported_layers(model: nn.Module, method: str = "bk") -> list[tuple[str, nn.Module, LayerRule]]:
    """Every module that directly owns a trainable parameter, with its rule; :class:`MethodUnsupported` otherwise.

    Frozen parameters (``requires_grad=False``) are ignored: they need no per-sample gradient."""
    layers = []
    for name, module in model.named_modules():
        owned = [pname for pname, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not owned:
            continue
        rule = rule_for(module)
        if rule is None:
            raise MethodUnsupported(
                method,
                f"module {_module_label(name, module)} directly owns trainable parameter(s) "
                f"{', '.join(repr(p) for p in owned)}, a layer type Book-Keeping has no per-sample rule for",
                f"supported: {', '.join(supported_types())}; freeze the parameter or move it into a supported layer",
            )
        extra = [pname for pname in owned if pname not in rule.params]
        problem = rule.check(module) or (
            f"extra trainable parameter(s) {', '.join(repr(p) for p in extra)}" if extra else None
        )
        if problem:
            raise MethodUnsupported(
                method,
                f"module {_module_label(name, module)}: {problem}",
                "Book-Keeping cannot compute its per-sample gradient",
            )
        layers.append((name, module, rule))
    return layers


@dataclass
class _Use:
    """One call of a hooked module during the captured forward."""

    module: nn.Module
    rule: LayerRule
    inp: Tensor  # (B, ...) detached module input
    edge: GradientEdge  # the module output's place in the autograd graph
    input_node: object | None  # the input's autograd node (None if the input needs no gradient)


@dataclass
class _ParamTerms:
    """Everything one parameter's per-sample gradient is made of: a materialised part plus factored uses."""

    per_sample: Tensor | None = None  # (B, *param.shape): sum of its instantiated uses
    factored: list[Factored] = field(default_factory=list)


@dataclass
class BKResult:
    loss: Tensor  # detached mean loss of the batch
    per_sample_norms: Tensor  # (B,) float32, ‖g_i‖ over all trainable parameters
    clip_factors: Tensor  # (B,) float32
    clipped_sums: dict[str, Tensor]  # Σ_i C_i g_i by trainable parameter name (engine.params order), param dtype
    # how each used parameter's norm was found: "ghost", "instantiated" or "ghost+instantiated" (mixed uses)
    norm_kinds: dict[str, str] = field(default_factory=dict)


def _norm_kind(entry: _ParamTerms) -> str:
    parts = (["ghost"] if entry.factored else []) + (["instantiated"] if entry.per_sample is not None else [])
    return "+".join(parts)


class BookKeeping:
    """Book-Keeping hooks attached to ``model``; :meth:`run` does forward, backward, norms and clipped sums.

    ``norm_mode``: "mixed" (ghost when 2T² < rows·cols, else instantiate), "ghost" or "instantiate".
    ``tile_size``: None forms whole T×T Grams; an int accumulates them over tile × tile blocks.
    Use as a context manager or call :meth:`close` to remove the hooks. Hooks record only inside :meth:`run`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        norm_mode: str = "mixed",
        tile_size: int | None = None,
        method: str = "bk",
        mode: TrainingMode = DEFAULT_MODE,
    ):
        if norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode must be one of {', '.join(NORM_MODES)}, got {norm_mode!r}")
        if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(f"tile_size must be None or an integer >= 1, got {tile_size!r}")
        self.model, self.norm_mode, self.tile_size, self.method, self.mode = model, norm_mode, tile_size, method, mode
        self.params = trainable_parameters(model)
        self._param_names = {id(p): name for name, p in self.params.items()}
        self._uses: list[_Use] | None = None  # a list only while run() is inside the model's forward
        self._handles = []
        try:
            for _, module, rule in supported_layers(model, method):
                self._handles.append(module.register_forward_hook(self._make_hook(rule), with_kwargs=True))
        except BaseException:
            self.close()
            raise

    def _make_hook(self, rule: LayerRule):
        def record_use(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            uses = self._uses
            # Outside run()'s forward (a recompute happens in the backward, after it) nothing is recorded; the
            # explicit check keeps it so should a recompute ever run inside the forward.
            if uses is None or checkpoint_pass() == "recompute":
                return
            if not torch.is_grad_enabled():
                # e.g. reentrant activation checkpointing: the call would get no per-sample gradient at all.
                raise RuntimeError(
                    f"{self.method}: {type(module).__name__} with trainable parameters ran with gradients disabled "
                    "inside the model's forward (reentrant checkpointing?); Book-Keeping needs its output gradient"
                )
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{self.method}: {type(module).__name__} returned {type(output).__name__}, not a tensor"
                )
            if output.grad_fn is None:  # nothing trainable reached this call
                return
            inp = args[0] if args else next(iter(kwargs.values()))
            input_node = get_gradient_edge(inp).node if inp.requires_grad else None
            uses.append(_Use(module, rule, inp.detach(), get_gradient_edge(output), input_node))

        return record_use

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> BookKeeping:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the pass -------------------------------------------------------------------------------------------

    def run(
        self,
        workload,
        batch,
        max_grad_norm: float,
        mark: PhaseMarker = no_mark,
        loss_scale: Tensor | None = None,
    ) -> BKResult:
        """Forward, one backward to the layer outputs, per-sample norms, clip factors and clipped sums.

        With ``loss_scale`` the backward runs on the scaled loss: the clipped sums come out multiplied by it (as
        any GradScaler'd backward's gradients), norms and clip factors are those of the unscaled gradients."""
        if not self._handles and self.params:
            raise RuntimeError(f"{self.method}: BookKeeping.run after close()")
        mark("forward")
        uses: list[_Use] = []
        self._uses = uses
        device = model_device(self.model)
        try:
            with self.mode.forward_context(device):
                output = self.model(*batch.inputs)
        finally:
            self._uses = None
        B = batch.batch_size
        with self.mode.forward_context(device):
            losses = checked_per_sample_losses(workload, workload.loss_per_sample(output, batch.target), B)  # (B,)
        del output

        self._check_no_hidden_uses(losses, uses)

        mark("backward")
        if uses:
            # Differentiate w.r.t. the layer *outputs*, not the parameters: autograd then skips every
            # weight-gradient matmul of the ordinary backward and never allocates p.grad (a full copy of the
            # weights); BK forms the weight gradients itself, once, already clipped, from A and G.
            total = scaled(losses.sum(), loss_scale)
            grads = list(torch.autograd.grad(total, [u.edge for u in uses], allow_unused=True))
            annotate_dp_buffer(*grads)
        else:
            grads = []
        loss = losses.detach().mean()
        del losses

        mark("clip")
        terms = self._collect_terms(uses, grads, B)
        del uses, grads
        kinds = {name: _norm_kind(entry) for name, entry in terms.items()}
        squared = self._squared_norms(terms, B)  # (B,) float32
        norms = unscaled(squared.sqrt(), loss_scale)
        factors = clip_factors(norms, max_grad_norm)
        annotate_dp_buffer(squared, norms, factors)
        sums = {}
        for name, p in self.params.items():
            sums[name] = self._clipped_sum(terms.pop(name), factors, p) if name in terms else torch.zeros_like(p)
        return BKResult(loss, norms, factors, sums, kinds)

    def _check_no_hidden_uses(self, losses: Tensor, uses: list[_Use]) -> None:
        """Raise if a trainable parameter reaches the loss other than through a hooked module call.

        A weight used functionally (``F.linear(x, self.wte.weight)``, ``x @ w.T``) would get no per-sample
        gradient from BK — a silently wrong result. Walk the autograd graph from the loss, stepping over every
        hooked call (from its output node straight to its input's node); any parameter still reached is such
        a use. Pure Python over graph nodes, no tensor work: milliseconds for a transformer step."""
        hooked = {use.edge.node: use for use in uses}
        param_ids = set(self._param_names)
        hidden: list[str] = []
        seen: set = set()
        stack = [losses.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            use = hooked.get(node)
            if use is not None:
                stack.append(use.input_node)
                continue
            variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
            if variable is not None:
                if id(variable) in param_ids:
                    hidden.append(self._param_names[id(variable)])
                continue
            stack.extend(next_node for next_node, _ in node.next_functions)
        if hidden:
            raise MethodUnsupported(
                self.method,
                f"trainable parameter(s) {', '.join(repr(n) for n in sorted(set(hidden)))} reach the loss outside "
                "the forward of the module that owns them (a functional use such as F.linear(x, weight))",
                "Book-Keeping sees a parameter only through its module's forward; call the module instead",
            )

    def _collect_terms(self, uses: list[_Use], grads: list, batch_size: int) -> dict[str, _ParamTerms]:
        """Group the uses' contributions by parameter. Empties ``uses`` and ``grads`` as it goes, so an
        instantiated use's A and G are freed as soon as its per-sample gradient exists."""
        terms: dict[str, _ParamTerms] = {}
        for k in range(len(uses)):
            use, grad = uses[k], grads[k]
            uses[k] = grads[k] = None  # from here on only the contributions below hold this call's A and G
            if grad is None:  # this call's output did not reach the loss
                continue
            for attr, contribution in use.rule.contributions(use.module, use.inp, grad).items():
                name = self._param_names[id(getattr(use.module, attr))]
                entry = terms.setdefault(name, _ParamTerms())
                if isinstance(contribution, Factored) and self._instantiates(contribution):
                    contribution = Instantiated(contribution.instantiate(self.params[name].dtype))
                if isinstance(contribution, Factored):
                    entry.factored.append(contribution)
                    continue
                per_sample = contribution.per_sample.reshape(batch_size, *self.params[name].shape)
                annotate_dp_buffer(per_sample)
                entry.per_sample = per_sample if entry.per_sample is None else entry.per_sample + per_sample
        return terms

    def _instantiates(self, use: Factored) -> bool:
        if self.norm_mode == "mixed":
            return not use.prefers_ghost()
        return self.norm_mode == "instantiate"

    def _squared_norms(self, terms: dict[str, _ParamTerms], batch_size: int) -> Tensor:
        """Σ over parameters of ‖Σ_uses g_i‖², expanded into self terms and cross terms of the uses."""
        device = next((p.device for p in self.params.values()), torch.device("cpu"))
        total = torch.zeros(batch_size, dtype=torch.float32, device=device)
        for entry in terms.values():
            S = entry.per_sample
            if S is not None:
                flat = S.reshape(batch_size, -1).float()
                total += torch.linalg.vecdot(flat, flat)
            for k, u in enumerate(entry.factored):
                total += factored_inner(u, u, self.tile_size)
                for v in entry.factored[k + 1 :]:
                    total += 2 * factored_inner(u, v, self.tile_size)
                if S is not None:
                    total += 2 * instantiated_inner(S.reshape(batch_size, u.rows, u.cols), u)
        return total

    @staticmethod
    def _clipped_sum(entry: _ParamTerms, factors: Tensor, param: nn.Parameter) -> Tensor:
        """Σ_i C_i g_i of one parameter, in its shape and dtype."""
        total = None
        if entry.per_sample is not None:
            S = entry.per_sample
            total = (factors.to(S.dtype) @ S.reshape(S.shape[0], -1)).view(param.shape)  # (numel,) -> param shape
        for use in entry.factored:
            part = use.weighted_sum(factors, param.dtype).view(param.shape)
            total = part if total is None else total + part
        return total.to(param.dtype)


class BKStep(ClippedSumStep):
    """The fused Book-Keeping step: forward → one backward → norms and clipped sums → noise → optimizer."""

    def __init__(self, inputs: StepInputs, engine: BookKeeping):
        super().__init__(inputs)
        self.engine = engine

    def clipped_sum(self, batch, mark: PhaseMarker, loss_scale: Tensor | None):
        result = self.engine.run(self.workload, batch, self.privacy.max_grad_norm, mark, loss_scale)
        return [result.clipped_sums[n] for n in self.params], result.loss

    def close(self) -> None:
        self.engine.close()


class _BookKeepingMethod(ClippedSumMethod):
    tile_size: int | None = None
    norm_mode: str = "mixed"

    def __init__(self, tile_size: int | None = None, norm_mode: str | None = None):
        if tile_size is not None:
            self.tile_size = tile_size
        if norm_mode is not None:
            self.norm_mode = norm_mode

    def _engine(self, model: nn.Module, mode: TrainingMode) -> BookKeeping:
        return BookKeeping(model, norm_mode=self.norm_mode, tile_size=self.tile_size, method=self.name, mode=mode)

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        supported_layers(model, self.name)

    def build(self, inputs: StepInputs) -> BKStep:
        return BKStep(inputs, self._engine(inputs.model, inputs.mode))

    def noise_free_pass(self, workload, model, batch, max_grad_norm, mode, loss_scale):
        with self._engine(model, mode) as engine:
            return engine.run(workload, batch, max_grad_norm, no_mark, loss_scale).clipped_sums


@register_method
class BKMethod(_BookKeepingMethod):
    """Book-Keeping (Bu et al. 2023): one backward, mixed ghost-norm/instantiation per layer."""

    name = "bk"


@register_method
class BKTiledMethod(_BookKeepingMethod):
    """Book-Keeping with ghost-norm Grams accumulated over T-tiles (tile_size=256)."""

    name = "bk-tiled"
    tile_size = DEFAULT_TILE_SIZE
