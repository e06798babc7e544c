"""``python -m bench.dp``: which DP method runs on which model — a Markdown compatibility matrix.

For every workload × method it computes one noise-free clipped gradient sum (batch 4, CPU by default) with the
method's own machinery and compares it with the per-sample loop (``microbatch``) at a clip norm equal to the
median per-sample gradient norm (so some samples clip and some do not; nondp is compared unclipped). A cell is
``ok`` when the relative error in global norm is at most 1e-4, ``MISMATCH`` when it is not, ``unsupported [n]``
when the method raised :class:`MethodUnsupported` (footnote n gives the library's error and the diagnosis).

Workloads are registered names with optional overrides after colons: ``gpt-tiny:tie_weights=False``; methods
likewise take options after a colon where they have some (``jax-privacy:microbatch=2``).

The compatibility matrix's default methods are every registered one, the JAX methods included (opt-in for the
bench, not here): with the ``jax`` extra their cells are compared like any other; without it they are
``unsupported`` naming ``pip install 'dpmem[jax]'``. The modes matrix leaves them out unless named (they train
in fp32 without checkpointing only).

``--modes`` prints the second matrix: per workload, every method × training mode (precision + activation
checkpointing, bench/dp/modes.py), each compared with the fp32 per-sample loop without checkpointing within the
precision's tolerance (``EQUIVALENCE_TOLERANCE``) at a clip norm in the middle of the largest gap between two
per-sample norms (so a 16-bit norm cannot move a sample across it); a cell shows the relative error.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from bench.config.cli import OneLineParser, run, usage_error
from bench.config.options import comma_list

from .base import available_methods, clipped_grad_sum, get_method
from .errors import DPConfigError, MethodUnsupported, ModeUnsupported
from .modes import CHECKPOINTINGS, EQUIVALENCE_TOLERANCE, PRECISIONS, TrainingMode, prepare_model

# Every tiny workload (models.catalog.TINY_WORKLOADS, tested), plus the Opacus #777 reproduction and its fix.
DEFAULT_WORKLOADS = (
    "dit-tiny-cond",
    "dit-tiny-uncond",
    "dit-tiny-plain",
    "dit-tiny-cond:learnable_pos_embed=True",
    "dit-tiny-cond:learnable_pos_embed=True:pos_embed_in_submodule=True",  # the #777 fix
    "gpt-tiny",
    "gpt-tiny-untied",
)
# The modes matrix: a DiT, the untied GPT (every method's comparable case) and the tied one (BK's cross terms).
DEFAULT_MODE_WORKLOADS = ("dit-tiny-cond", "gpt-tiny-untied", "gpt-tiny")
ALL_MODES = tuple(TrainingMode(p, c) for p in PRECISIONS for c in CHECKPOINTINGS)
PROG = "python -m bench.dp"
REFERENCE = "microbatch"
TOLERANCE = 1e-4


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()]).double()  # float32 norms of 1e5 entries drift by 1e-5


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """‖got − ref‖ / ‖ref‖ over all parameters concatenated (inf if the keys differ)."""
    if list(got) != list(ref):
        return math.inf
    a, b = _flat(got), _flat(ref)
    return float((a - b).norm() / b.norm())


def refusal_note(exc: MethodUnsupported | ModeUnsupported) -> str:
    """A refusal's footnote: the library's error, then the diagnosis where there is one."""
    return exc.reason + (f" — {exc.diagnosis}" if exc.diagnosis else "")


def median_sample_norm(workload, model, batch) -> float:
    """Median over the batch of the per-sample gradient norm ‖g_i‖ (by the loop, unclipped)."""
    return float(per_sample_norms(workload, model, batch).median())


def per_sample_norms(workload, model, batch) -> torch.Tensor:
    """‖g_i‖ of every sample of the batch (by the loop, unclipped), float64."""
    return torch.stack(
        [
            _flat(clipped_grad_sum(REFERENCE, workload, model, batch.select(i), math.inf)).norm()
            for i in range(batch.batch_size)
        ]
    )


def gap_clip_norm(norms: torch.Tensor) -> float:
    """A clip norm in the (geometric) middle of the largest gap between two adjacent per-sample norms: some
    samples clip, some do not, and each is as far from C as the batch allows."""
    ordered = norms.sort().values
    k = int((ordered[1:] / ordered[:-1]).argmax())
    return float((ordered[k] * ordered[k + 1]).sqrt())


def parse_modes(text: str) -> list[TrainingMode]:
    """``"all"`` or a comma list of mode labels (``fp32``, ``amp-bf16+blocks``); DPConfigError if one is bad."""
    if text == "all":
        return list(ALL_MODES)
    modes = []
    for label in (s.strip() for s in text.split(",") if s.strip()):
        precision, _, checkpointing = label.partition("+")
        modes.append(TrainingMode(precision, checkpointing or "none"))
    return modes


def mode_rows(workload_specs, methods, modes, batch_size: int = 4, device: str = "cpu"):
    """Yield (spec, method, mode label, cell, footnote or None) for every workload × mode × method."""
    import models

    for spec in workload_specs:
        workload = models.get_workload(spec)
        reference_model = workload.build_model(device)
        batch = workload.make_batch(batch_size, device=device)
        clip = gap_clip_norm(per_sample_norms(workload, reference_model, batch))
        references = {
            clip: clipped_grad_sum(REFERENCE, workload, reference_model, batch, clip),
            math.inf: clipped_grad_sum(REFERENCE, workload, reference_model, batch, math.inf),
        }
        for mode in modes:
            model = workload.build_model(device)
            try:
                prepare_model(model, workload, mode, device)
            except ModeUnsupported as exc:
                for method in methods:
                    yield spec, method, mode.label, "unsupported", refusal_note(exc)
                continue
            for method in methods:
                norm = math.inf if method == "nondp" else clip
                try:
                    got = clipped_grad_sum(method, workload, model, batch, norm, mode=mode)
                except MethodUnsupported as exc:
                    yield spec, method, mode.label, "unsupported", refusal_note(exc)
                    continue
                err = relative_error({n: got[n] for n in references[norm]}, references[norm])
                verdict = "ok" if err <= EQUIVALENCE_TOLERANCE[mode.precision] else "MISMATCH"
                yield spec, method, mode.label, f"{verdict} ({err:.0e})", None


def render_mode_matrix(rows, workload_specs, methods, modes) -> str:
    """One Markdown table per workload (methods × modes), then the numbered footnotes of all of them."""
    cells: dict[tuple[str, str, str], str] = {}
    numbers: dict[str, int] = {}  # one footnote per distinct text: a refusal repeats across modes and workloads
    note_methods: dict[str, list[str]] = {}
    for spec, method, label, cell, note in rows:
        if note is not None:
            number = numbers.setdefault(note, len(numbers) + 1)
            if method not in note_methods.setdefault(note, []):
                note_methods[note].append(method)
            cell = f"{cell} [{number}]"
        cells[spec, method, label] = cell
    notes = [f"{n}. {', '.join(f'`{m}`' for m in note_methods[text])}: {text}" for text, n in numbers.items()]
    labels = [mode.label for mode in modes]
    lines: list[str] = []
    for spec in workload_specs:
        lines += [
            f"`{spec}`",
            "",
            "| method | " + " | ".join(f"`{label}`" for label in labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        lines += [f"| `{m}` | " + " | ".join(cells[spec, m, label] for label in labels) + " |" for m in methods]
        lines.append("")
    return "\n".join(lines + notes).rstrip("\n")


def compatibility_rows(workload_specs, methods, batch_size: int = 4, device: str = "cpu"):
    """Yield (spec, method, cell, footnote or None) for every pair."""
    import models

    for spec in workload_specs:
        workload = models.get_workload(spec)
        model = workload.build_model(device)
        batch = workload.make_batch(batch_size, device=device)
        clip = median_sample_norm(workload, model, batch)
        references = {
            clip: clipped_grad_sum(REFERENCE, workload, model, batch, clip),
            math.inf: clipped_grad_sum(REFERENCE, workload, model, batch, math.inf),
        }
        for method in methods:
            norm = math.inf if method == "nondp" else clip
            try:
                got = clipped_grad_sum(method, workload, model, batch, norm)
            except MethodUnsupported as exc:
                yield spec, method, "unsupported", refusal_note(exc)
                continue
            if method == REFERENCE:
                yield spec, method, "ok (reference)", None
                continue
            err = relative_error(got, references[norm])
            yield spec, method, ("ok" if err <= TOLERANCE else f"MISMATCH (rel. err {err:.1e})"), None


def render_matrix(rows, workload_specs, methods) -> str:
    cells: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    for spec, method, cell, note in rows:
        if note is not None:
            notes.append(f"{len(notes) + 1}. `{method}` × `{spec}`: {note}")
            cell = f"{cell} [{len(notes)}]"
        cells[spec, method] = cell
    lines = [
        "| workload | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for spec in workload_specs:
        lines.append(f"| `{spec}` | " + " | ".join(cells[spec, m] for m in methods) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        type=comma_list,
        default=None,
        help="comma-separated workload names, overrides after colons (gpt-tiny:tie_weights=False); default: every "
        "tiny workload and the #777 pair, or with --modes " + ", ".join(DEFAULT_MODE_WORKLOADS),
    )
    parser.add_argument(
        "--modes",
        nargs="?",
        const="all",
        default=None,
        help="print the training-mode matrix instead: 'all' (default) or a comma list like fp32+blocks,amp-bf16",
    )
    parser.add_argument(
        "--methods",
        type=comma_list,
        default=None,
        help="comma-separated DP methods, options after a colon (jax-privacy:microbatch=2) (default: all "
        "registered; the JAX ones too, except with --modes)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import models

    try:
        # the JAX methods run fp32 full training only: a row of refusals in the modes matrix unless named
        given = args.methods or available_methods(include_opt_in=args.modes is None)
        # unknown name or option -> DPConfigError listing the valid ones; specs in canonical spelling
        methods = [get_method(method).name for method in given]
        default_specs = DEFAULT_MODE_WORKLOADS if args.modes is not None else DEFAULT_WORKLOADS
        specs = list(args.workloads) if args.workloads is not None else list(default_specs)
        for spec in specs:
            models.get_workload(spec)
        modes = parse_modes(args.modes) if args.modes is not None else None
        if args.batch_size < 2:
            raise DPConfigError(
                f"--batch-size must be >= 2 (a median clip norm needs two samples), got {args.batch_size}"
            )
    except (DPConfigError, models.WorkloadError) as exc:
        return usage_error(PROG, str(exc))

    warnings.filterwarnings("ignore")  # Opacus' and torch's UserWarnings would bury the table
    if modes is not None:
        rows = mode_rows(specs, methods, modes, args.batch_size, args.device)
        print(render_mode_matrix(rows, specs, methods, modes))
        return 0
    rows = compatibility_rows(specs, methods, args.batch_size, args.device)
    print(render_matrix(rows, specs, methods))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
