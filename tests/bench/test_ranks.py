"""Methods across ranks (bench/dp/parallel.py): one torchrun launch, 2 gloo ranks, every method × strategy.

The launch (tests/bench/ranks_check_worker.py) is shared by the module: the clipped gradient across ranks equals
the one-process sum, noise is added once per logical batch, the library refusals are real; and the fake process
group's per-rank prediction (bench/ranks/predict.py) equals the real ranks' measured tensor bytes — byte for byte
under DDP; under FSDP up to gloo's own buffers, which the tracker names (``adopted_tensor_bytes``), and the
buffers whose last reference a gloo worker thread dropped after the step had let them go (on a busy machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import dp
from bench.ranks.predict import predict_rank
from tests.bench.ranks_check_worker import MEASURED, NOISE_CHECKED, measured_job

REPO = Path(__file__).resolve().parents[2]

# (method, strategy) -> a phrase of the real refusal; every other pair must run.
REFUSED = {
    ("opacus-hooks", "fsdp"): "_forward_counter",  # Opacus' GradSampleModule on FSDP2's swapped parameters
    ("opacus-functorch", "fsdp"): "_forward_counter",
    ("opacus-ew", "fsdp"): "ExpandedWeight",
    ("bk", "fsdp"): "not implemented by dpmem",
    ("bk-tiled", "fsdp"): "not implemented by dpmem",
    ("torch-func", "fsdp"): "not implemented by dpmem",
    ("microbatch", "fsdp"): "not implemented by dpmem",
}
PAIRS = [(m, p) for p in ("ddp", "fsdp") for m in dp.available_methods()]


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ranks") / "checks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.bench.ranks_check_worker", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method,parallel", PAIRS, ids=[f"{m}-{p}" for m, p in PAIRS])
def test_clipped_sum_across_ranks_equals_the_one_process_sum(checks, method, parallel):
    entry = checks[f"{method}/{parallel}"]
    if (method, parallel) in REFUSED:
        assert entry["status"] == "unsupported"
        assert REFUSED[method, parallel] in entry["reason"]
        return
    assert entry["status"] == "ok", entry["reason"]
    # the equivalence bound of docs/ranks.md; measured ≤ 1.4e-7 (fp32, 2 ranks × 2 samples, some clipped)
    assert entry["relative_error"] <= 1e-4


@pytest.mark.parametrize("method,parallel", sorted(NOISE_CHECKED))
def test_noise_is_added_once_per_logical_batch(checks, method, parallel):
    """The averaged gradient's noise has std σ·C/B (× B here: σ·C), not √world·σ·C/B as per-rank noise would."""
    entry = checks[f"{method}/{parallel}"]
    assert entry["noise_elements"] > 100_000  # the std is known to ±0.3 %
    assert abs(entry["noise_std_over_sigma_c"] - 1.0) < 0.03
    assert entry["ranks_agree"]  # one noise draw for the whole batch: the replicas stay equal


@pytest.mark.parametrize(
    "method,parallel,rank",
    [("bk", "ddp", 0), ("nondp", "fsdp", 1), ("opacus-ghost", "fsdp", 1)],
    ids=["bk-ddp-rank0", "nondp-fsdp-rank1", "opacus-ghost-fsdp-rank1"],
)
def test_fake_process_group_predicts_the_measured_rank(checks, method, parallel, rank):
    """Rank 1 of FSDP holds the shorter shards (dims split 6/5): its bytes differ from rank 0's."""
    assert (method, parallel) in MEASURED
    measured = checks[f"{method}/{parallel}"]["ranks"][rank]
    predicted = predict_rank(measured_job(method, parallel), rank)
    assert measured["status"] == predicted.status == "ok", (measured["reason"], predicted.reason)
    memory = predicted.memory
    # Storages made out of the tracker's sight, first seen as op inputs: gloo's copies (its reduce-scatter copies
    # its whole input in its own thread), counted from the step's start. Fake tensors have none.
    gloo = measured["adopted_tensor_bytes"] - memory.adopted_tensor_bytes
    assert memory.adopted_tensor_bytes == 0
    assert measured["baseline_tensor_bytes"] - memory.baseline_tensor_bytes == gloo
    # A gloo worker holds the Work of the collective it ran (its input and output) until it loops back for the
    # next one: descheduled on a busy machine, it outlives the step's own references and drops the last one
    # later, from its thread (FSDP's previous reduce-scatter input, an all-gather output). Only those storages
    # can be live past where the program, and so the prediction, frees them; idle, there are usually none.
    late = measured["released_by_other_threads_bytes"]
    if parallel == "ddp":
        assert gloo == late == 0
        assert measured["peak_tensor_bytes"] == memory.peak_tensor_bytes
        assert measured["breakdown"] == memory.breakdown
    else:
        assert gloo > 0
        assert 0 <= measured["peak_tensor_bytes"] - memory.peak_tensor_bytes <= gloo + late, (gloo, late)
