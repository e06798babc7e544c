"""``python -m bench.dp``: which DP method runs on which model — a Markdown compatibility matrix.

For every workload × method it computes one noise-free clipped gradient sum (batch 4, CPU by default) with the
method's own machinery and compares it with the per-sample loop (``microbatch``) at a clip norm equal to the
median per-sample gradient norm (so some samples clip and some do not; nondp is compared unclipped). A cell is
``ok`` when the relative error in global norm is at most 1e-4, ``MISMATCH`` when it is not, ``unsupported [n]``
when the method raised :class:`MethodUnsupported` (footnote n gives the library's error and the diagnosis).

Workloads are registered names with optional overrides after colons: ``gpt-tiny:tie_weights=False``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

from .base import available_methods, clipped_grad_sum, get_method
from .errors import DPConfigError, MethodUnsupported

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


def median_sample_norm(workload, model, batch) -> float:
    """Median over the batch of the per-sample gradient norm ‖g_i‖ (by the loop, unclipped)."""
    norms = [
        _flat(clipped_grad_sum(REFERENCE, workload, model, batch.select(i), math.inf)).norm()
        for i in range(batch.batch_size)
    ]
    return float(torch.stack(norms).median())


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
                note = exc.reason + (f" — {exc.diagnosis}" if exc.diagnosis else "")
                yield spec, method, "unsupported", note
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
    parser = argparse.ArgumentParser(prog="python -m bench.dp", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma-separated workload names, overrides after colons (gpt-tiny:tie_weights=False)",
    )
    parser.add_argument("--methods", default=None, help="comma-separated DP methods (default: all registered)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import models

    try:
        methods = available_methods() if args.methods is None else [m for m in args.methods.split(",") if m]
        for method in methods:
            get_method(method)  # unknown name -> DPConfigError listing the valid ones
        specs = [s for s in args.workloads.split(",") if s]
        for spec in specs:
            models.get_workload(spec)
        if args.batch_size < 2:
            raise DPConfigError(
                f"--batch-size must be >= 2 (a median clip norm needs two samples), got {args.batch_size}"
            )
    except (DPConfigError, models.WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    warnings.filterwarnings("ignore")  # Opacus' and torch's UserWarnings would bury the table
    rows = compatibility_rows(specs, methods, args.batch_size, args.device)
    print(render_matrix(rows, specs, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
