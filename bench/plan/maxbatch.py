"""Max-batch search (`pytest bench/ --max-batch`): the largest batch that fits, and an affine memory model.

Per workload × method × device: double the batch from 1 until a probe runs out of memory (or the limit),
then bisect between the last batch that fit and the first that did not. Every ok probe's peak feeds a least
squares fit peak(B) = fixed + per_sample·B, which predicts the max batch for any memory size ("would this fit
on an 80 GB card?"). What "fits" means: the GPU's own capacity, or on CPU the bench's memory cap. On a GPU the
fit's predictions are made for each size *less* the memory outside the allocator that the case found in use at
its start (``nvml_baseline_bytes``: the CUDA context and other processes), which the allocator cannot have.

On the meta device nothing runs out of memory, so :func:`search_budgets` answers every memory budget at once:
a probe is a real tracked meta step, "fits" means the overhead model (bench/plan/overhead.py) puts its peak tensor
bytes within the budget, and each budget's answer is exact under that model — the largest B that fits and
B + 1 that does not were both probed. The affine fit of the probes so far only *guesses* where to probe next
(two probes per budget when the peak is affine in B), bisection does the rest; the peak is assumed not to
fall as B grows. The batch itself is drawn on the host (CPU) before it moves to meta: a probe whose batch the host
could not allocate (``HOST_OOM``) is the machine's limit, not a budget's. The search goes on below it (nothing at
or above it is probed again), so a budget whose boundary lies below is still answered exactly, and one whose
boundary the host cannot reach keeps the largest batch that fits as a lower bound, ``host_limit_batch`` saying
where the host stopped it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.config.sizes import size_text
from bench.plan.overhead import OverheadModel
from bench.results.record import HOST_OOM, BatchProbe, BudgetAnswer, MaxBatchRecord

Probe = Callable[[int], BatchProbe]
# A meta probe: the batch's probe record and the breakdown of its peak (CATEGORIES -> bytes).
MetaProbe = Callable[[int], tuple[BatchProbe, dict[str, int]]]


def search(
    probe: Probe, limit: int, say: Callable[[str], None] = lambda msg: None
) -> tuple[int | None, int | None, list[BatchProbe]]:
    """Return (largest ok batch, smallest failing batch, probes in the order run). ``limit`` caps the batch."""
    if limit < 1:
        raise ValueError(f"max-batch limit must be >= 1, got {limit}")
    probes: list[BatchProbe] = []

    def run(b: int) -> bool:
        result = probe(b)
        probes.append(result)
        say(f"batch {b}: {result.status}")
        return result.status == "ok"

    last_ok, first_fail, b = None, None, 1
    while b <= limit:
        if run(b):
            last_ok, b = b, b * 2
        else:
            first_fail = b
            break
    if first_fail is None and last_ok is not None and last_ok < limit:
        if run(limit):
            return limit, None, probes
        first_fail = limit
    if first_fail is None:
        return last_ok, None, probes
    lo, hi = (last_ok or 0), first_fail
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), hi, probes


def affine_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares (fixed, per_sample) of peak = fixed + per_sample·B; None with < 2 distinct batch sizes."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in points)
    sxy = sum((b - mean_b) * (y - mean_y) for b, y in points)
    per_sample = sxy / sxx
    return mean_y - per_sample * mean_b, per_sample


def predict_max_batch(fixed: float, per_sample: float, memory_bytes: float) -> int | None:
    """Largest B with fixed + per_sample·B ≤ memory (0 if even the fixed part does not fit); None when the fit
    has no positive per-sample slope and so bounds nothing."""
    if per_sample <= 0:
        return None
    return max(0, math.floor((memory_bytes - fixed) / per_sample))


class _BudgetSearch:
    """The probes of one meta search, run once each and shared by every budget."""

    def __init__(self, probe: MetaProbe, overhead: OverheadModel, limit: int, say: Callable[[str], None], start: int):
        self.probe, self.overhead, self.limit, self.say, self.start = probe, overhead, limit, say, start
        self.results: dict[int, tuple[BatchProbe, dict[str, int]]] = {}
        self.order: list[BatchProbe] = []
        self.failure: BatchProbe | None = None  # an unsupported / error probe stops the search
        self.host_limit: int | None = None  # the smallest batch the host could not draw: probes stay below it

    def run(self, b: int) -> BatchProbe:
        if b not in self.results:
            result, breakdown = self.probe(b)
            self.results[b] = (result, breakdown)
            self.order.append(result)
            self.say(f"batch {b}: {result.status}, peak tensor bytes {result.peak_tensor_bytes}")
            if result.status in ("unsupported", "error"):
                self.failure = result
            elif result.status == HOST_OOM:
                self.host_limit = min(b, self.host_limit or b)
        return self.results[b][0]

    @property
    def reachable(self) -> int:
        """The largest batch the search may probe: its limit, or the last one below the host's limit."""
        return self.limit if self.host_limit is None else min(self.limit, self.host_limit - 1)

    def fits(self, b: int, budget: int) -> bool:
        result = self.run(b)
        return result.status == "ok" and self.overhead.fits(result.peak_tensor_bytes, budget)

    def guess(self, budget: int) -> int | None:
        """The largest B the affine fit of the two largest ok probes puts within ``budget`` (None: no fit)."""
        ok = sorted(b for b, (r, _) in self.results.items() if r.status == "ok" and r.peak_tensor_bytes)
        if len(ok) < 2:
            return None
        fit = affine_fit([(b, float(self.results[b][0].peak_tensor_bytes)) for b in ok[-2:]])
        if fit is None or fit[1] <= 0:
            return None
        return math.floor((self.overhead.tensor_capacity(budget) - fit[0]) / fit[1])

    def peak(self, b: int) -> int:
        return self.results[b][0].peak_tensor_bytes or 0

    def between(self, lo: int, hi: int, budget: int) -> int:
        """Where the line through the probes at ``lo`` and ``hi`` crosses the budget (within (lo, hi))."""
        rise = self.peak(hi) - self.peak(lo) if lo else 0
        if rise <= 0:
            return (lo + hi) // 2
        guess = lo + math.floor((self.overhead.tensor_capacity(budget) - self.peak(lo)) * (hi - lo) / rise)
        return min(max(guess, lo + 1), hi - 1)

    def answer(self, budget: int) -> BudgetAnswer:
        """The exact boundary for ``budget``: probes B and B + 1 (or finds that B = 1 or the limit decides)."""
        lo = max((b for b in self.results if self.fits(b, budget)), default=0)
        hi = min((b for b in self.results if not self.fits(b, budget)), default=None)
        if lo == 0 and hi is None:  # nothing known yet: start at a batch where the peak grows with B
            first = min(self.start, self.limit)
            lo, hi = (first, None) if self.fits(first, budget) else (0, first)
        while hi is None and self.failure is None and lo < self.reachable:  # grow until a batch does not fit
            guess = self.guess(budget)
            target = guess + 1 if guess is not None and guess + 1 > lo else 8 * lo
            step = min(max(target, lo + 1), self.reachable)
            if self.fits(step, budget):
                lo = step
            else:
                hi = step
        interpolate = True  # alternate the secant guess (and its neighbour) with halving, so both ends move
        while hi is not None and hi - lo > 1 and self.failure is None:
            mid = self.between(lo, hi, budget) if interpolate else (lo + hi) // 2
            if self.fits(mid, budget):
                lo = mid
                if interpolate and mid + 1 < hi and not self.fits(mid + 1, budget):
                    hi = mid + 1
            else:
                hi = mid
            interpolate = not interpolate
        if self.failure is not None:
            return BudgetAnswer(budget)
        if hi is not None and self.results[hi][0].status == HOST_OOM:
            hi = None  # the host's limit, not the budget's: lo is a lower bound
        answer = BudgetAnswer(budget, max_batch=lo or None, first_failing_batch=hi)
        if hi is None and lo < self.limit and self.host_limit is not None:
            answer.host_limit_batch = self.host_limit
        if lo:
            result, breakdown = self.results[lo]
            answer.peak_tensor_bytes = result.peak_tensor_bytes
            answer.device_bytes = self.overhead.device_bytes(result.peak_tensor_bytes)
            answer.breakdown = dict(breakdown)
        if hi is not None:
            answer.first_failing_device_bytes = self.overhead.device_bytes(self.peak(hi))
        return answer


def answer_text(answer: BudgetAnswer) -> str:
    """One budget's answer for a reader: "22 in 6 MiB (batch 23 needs 6.02 MiB)", "nothing fits in 1 KiB: batch 1
    needs 2.52 MiB", "≥4096 in 141 GiB (the search limit)", "≥39 in 80 GiB (host memory limit at batch 40)"."""
    budget = size_text(answer.budget_bytes)
    if answer.host_limit_batch is not None:
        found = f"≥{answer.max_batch}" if answer.max_batch else "no batch found to fit"
        return f"{found} in {budget} (host memory limit at batch {answer.host_limit_batch})"
    if answer.first_failing_batch is None:
        return f"≥{answer.max_batch} in {budget} (the search limit)" if answer.max_batch else f"none in {budget}"
    needs = (
        f"needs {size_text(answer.first_failing_device_bytes)}"
        if answer.first_failing_device_bytes is not None
        else "does not fit"
    )
    if answer.max_batch is None:
        return f"nothing fits in {budget}: batch {answer.first_failing_batch} {needs}"
    return f"{answer.max_batch} in {budget} (batch {answer.first_failing_batch} {needs})"


def non_allocator_bytes(baselines: list[int | None]) -> int | None:
    """The memory a GPU case could not give its allocator: the median NVML reading at case start (the CUDA
    context and other processes) over the search's probes; None when none was read."""
    read = sorted(b for b in baselines if b is not None)
    return read[len(read) // 2] if read else None


def search_budgets(
    probe: MetaProbe,
    budgets: list[int],
    overhead: OverheadModel,
    limit: int,
    say: Callable[[str], None] = lambda msg: None,
    start: int = 8,
) -> tuple[list[BudgetAnswer], list[BatchProbe]]:
    """Exact largest batch per budget on meta (module docstring); returns (answers by budget, probes in the order
    run). The first probe is at ``start`` (then ×8 until one does not fit, or the fit's guess): past the smallest
    batches, where a step's peak is often its optimizer's and does not grow with B, the fit guesses well. Stops at
    the first unsupported or error probe (every answer is then empty); stays below a batch the host could not
    draw (``host_limit_batch``)."""
    if limit < 1:
        raise ValueError(f"max-batch limit must be >= 1, got {limit}")
    search = _BudgetSearch(probe, overhead, limit, say, start)
    answers = [search.answer(budget) for budget in sorted(set(budgets))]
    if search.failure is not None:
        answers = [BudgetAnswer(a.budget_bytes) for a in answers]
    return answers, search.order


def build_record(
    workload: str,
    method: str,
    device: str,
    probes: list[BatchProbe],
    max_ok: int | None,
    first_fail: int | None,
    *,
    fit_metric: str,
    memory_limit_bytes: int | None,
    predict_for: list[int],
    capacity: Callable[[int], float] = float,
) -> MaxBatchRecord:
    """The search's record: the fit of the ok probes' ``fit_metric`` and its max batch for ``memory_limit_bytes``
    and every size in ``predict_for``. ``capacity(size)`` is how much of a memory size the fitted figure may use:
    the size itself (CPU), the size less the memory outside the allocator (CUDA), the size through the
    overhead model (meta)."""
    record = MaxBatchRecord(
        workload=workload,
        method=method,
        device=device,
        memory_limit_bytes=memory_limit_bytes,
        max_batch_measured=max_ok,
        first_failing_batch=first_fail,
        fit_metric=fit_metric,
        probes=probes,
    )
    bad = next((p for p in probes if p.status in ("unsupported", "error")), None)
    if bad is not None:
        record.status = bad.status
        return record
    points = [(p.batch_size, getattr(p, fit_metric)) for p in probes if p.status == "ok" and getattr(p, fit_metric)]
    fit = affine_fit(points)
    if fit is not None:
        record.fit_fixed_bytes, record.fit_per_sample_bytes = fit
        sizes = sorted(set(predict_for) | ({memory_limit_bytes} if memory_limit_bytes else set()))
        record.predicted_max_batch = {str(m): predict_max_batch(*fit, capacity(m)) for m in sizes}
    return record
