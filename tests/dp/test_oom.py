"""Running out of memory is a result of its own (``oom``) for every method: no method's error handling may turn it
into ``unsupported`` (with a wrong diagnosis) or ``error``, whatever the allocator's message, however wrapped."""

from __future__ import annotations

import math
import os
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

import models
from bench import dp
from bench.case.spec import CaseSpec
from bench.config.cli import pytest_bench_command
from bench.dp.errors import MethodUnsupported, is_out_of_memory, out_of_memory_in
from bench.results.record import CaseRecord, MaxBatchRecord, from_jsonl_line
from models.contract import check_workload_contract

from .custom_workloads import MLP, Injector, cpu_config, mlp_workload, registered, run_cpu_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[2]
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError(CUDA_OOM),
        RuntimeError(CUBLAS),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes."),
        MemoryError(),  # Python's, and the bench's memory cap (a MemoryError subclass: end to end below)
    ],
    ids=lambda exc: type(exc).__name__ + ":" + str(exc)[:24],
)
def test_allocation_failures_are_out_of_memory(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx(...)`"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x6 and 8x3)"),
        ValueError("batch size must be an integer >= 1"),
        MethodUnsupported("opacus-ghost", "NotImplementedError: Parameter tying is not supported with Ghost Clipping"),
    ],
)
def test_other_errors_are_not(exc):
    assert not is_out_of_memory(exc)


def test_an_oom_anywhere_in_the_chain_counts():
    oom = torch.OutOfMemoryError(CUDA_OOM)
    try:
        try:
            raise oom
        except RuntimeError as inner:
            raise MethodUnsupported("torch-func", "RuntimeError: vmap failed", "a wrong diagnosis") from inner
    except MethodUnsupported as wrapped:
        assert out_of_memory_in(wrapped) is oom
    try:
        try:
            raise oom
        except RuntimeError:
            raise KeyError("cleanup failed while handling it") from None  # the chain is cut on purpose
    except KeyError as cut:
        assert not is_out_of_memory(cut)


@pytest.fixture(scope="module")
def injector():
    """A workload whose model raises the armed exception in every forward; its contract already checked."""
    injector = Injector()
    workload = mlp_workload("byo-oom", model_fn=partial(MLP, injector=injector))
    with registered(workload):
        check_workload_contract(workload, workload.build_model(), "cpu")  # unarmed: the verdict is cached
        yield injector


ERRORS = {
    "torch-oom": (lambda: torch.OutOfMemoryError(CUDA_OOM), "OutOfMemoryError: " + CUDA_OOM),
    "cublas-alloc": (lambda: RuntimeError(CUBLAS), "RuntimeError: " + CUBLAS),
    "wrapped": (
        lambda: _wrapped(torch.OutOfMemoryError(CUDA_OOM)),
        "OutOfMemoryError: " + CUDA_OOM,  # the OOM itself is quoted, not its wrapper
    ),
}


def _wrapped(oom: BaseException) -> BaseException:
    error = RuntimeError("a library's own error, raised from an allocation failure")
    error.__cause__ = oom
    return error


@pytest.mark.parametrize("kind", list(ERRORS))
def test_an_oom_inside_any_method_is_recorded_as_oom(injector, kind):
    make, quoted = ERRORS[kind]
    methods = dp.available_methods()
    injector.make, injector.calls = make, 0
    try:
        records = run_cpu_cases([CaseSpec("byo-oom", m, 4, "cpu") for m in methods], cpu_config())
    finally:
        injector.make = None
    assert injector.calls >= len(methods)  # every method ran the model and met the error
    for spec, record in records.items():
        assert (record.status, record.reason) == ("oom", f"batch 4: {quoted}"), f"{spec.method}: {record.reason}"


@pytest.mark.parametrize("method", dp.available_methods())
def test_the_python_api_raises_the_oom_itself_never_unsupported(injector, method):
    workload = models.get_workload("byo-oom")
    model, batch = workload.build_model(), workload.make_batch(4)
    clip = math.inf if method == "nondp" else 1.0
    injector.make = lambda: RuntimeError(CUBLAS)
    try:
        with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED") as info:
            dp.clipped_grad_sum(method, workload, model, batch, clip)
    finally:
        injector.make = None
    assert not isinstance(info.value, MethodUnsupported)


def test_an_oom_while_opacus_wraps_the_model_is_raised_unchanged(monkeypatch):
    workload = models.get_workload("gpt-tiny-untied")
    model = workload.build_model()
    privacy = dp.resolve_privacy(1.0, accountant="rdp")
    dp.build_step("opacus-hooks", workload, model, privacy=privacy, batch_size=2).close()  # the probe passed
    oom = torch.OutOfMemoryError(CUDA_OOM)

    def wrap(self, model):
        raise oom

    monkeypatch.setattr(type(dp.get_method("opacus-hooks")), "wrap", wrap)
    with pytest.raises(torch.OutOfMemoryError) as info:
        dp.build_step("opacus-hooks", workload, model, privacy=privacy, batch_size=2)
    assert info.value is oom
    assert not any(m._forward_hooks for m in model.modules())  # the half-wrapped model was released


# ---------------------------------------------------------------------------------------------------------------
# end to end: torch-func under the CPU memory cap (its vmap wrapper used to turn the cap into "unsupported")


def _bench(tmp_path: Path, name: str, *args: str) -> list:
    jsonl = tmp_path / f"{name}.jsonl"
    cmd = pytest_bench_command("--rounds", "1")
    cmd += [f"--benchmark-json={tmp_path / f'{name}.json'}", f"--results={jsonl}", *args]
    cmd += ["--precision", "fp32", "--checkpointing", "none"]  # the default preset has more modes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [from_jsonl_line(line) for line in jsonl.read_text().splitlines() if line.strip()]


def test_torch_func_over_the_memory_cap_is_oom_and_larger_batches_are_skipped(tmp_path):
    common = ["--workloads", "gpt-tiny", "--methods", "torch-func", "--memory-cap", "32MiB"]
    records = {r.batch_size: r for r in _bench(tmp_path, "cap", *common, "--batch-sizes", "2,512,1024")}
    assert all(isinstance(r, CaseRecord) for r in records.values())
    assert records[2].status == "ok"
    assert records[512].status == "oom", records[512].reason
    assert records[512].reason.startswith("batch 512: MemoryCapExceeded: ") and "cap" in records[512].reason
    assert "vmap" not in records[512].reason  # no diagnosis of a vmap limit for a full memory
    assert records[1024].status == "oom" and "not run: batch 512 already ran out of memory" in records[1024].reason


def test_torch_func_max_batch_search_ends_with_a_fit(tmp_path):
    args = ["--max-batch", "--workloads", "gpt-tiny", "--methods", "torch-func", "--memory-cap", "4MiB"]
    (result,) = _bench(tmp_path, "maxbatch", *args)
    assert isinstance(result, MaxBatchRecord) and result.status == "ok", result.reason
    assert result.max_batch_measured >= 2 and result.first_failing_batch == result.max_batch_measured + 1
    assert result.fit_per_sample_bytes > 0
    assert {p.status for p in result.probes} == {"ok", "oom"}
    predicted = result.predicted_max_batch[str(4 * 2**20)]
    assert abs(predicted - result.max_batch_measured) <= max(2, result.max_batch_measured // 10)
