"""The workload contract is checked once, before any method runs: a user's broken workload is the same one-line
``error`` for every method, never an ``unsupported`` for some and a crash for others, never a silent run."""

from __future__ import annotations

import pytest
import torch

import models
from bench import dp
from bench.case.spec import CaseSpec
from models import contract
from models.contract import WorkloadContractError, check_workload_contract

from .custom_workloads import CONTRACT_BREAKERS, cpu_config, mlp_workload, registered, run_cpu_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEE = '(see docs/workloads.md "Bring your own model")'
DETERMINISM = "a step must be a deterministic function of (weights, batch)"
# workload name -> what its one error line must say after "workload '<name>': "
BROKEN_RULE = {
    "byo-scalar-loss": "loss_fn returned shape () for a batch of 2 — it must return the per-sample loss, shape [B]",
    "byo-tuple-forward": "forward returned tuple — it must return a tensor",
    "byo-dropout": f"two forwards of one batch with the same weights gave different outputs — {DETERMINISM}",
    "byo-global-rng-batch": f"make_batch gave two different batches for two equally seeded generators — {DETERMINISM}",
}
# Shape rules broke differently in every method before the check (an error here, unsupported there): every
# method is run. The determinism rules broke nothing visibly (every method ran): two methods show the refusal.
METHODS_RUN = {
    "byo-scalar-loss": dp.available_methods(),
    "byo-tuple-forward": dp.available_methods(),
    "byo-dropout": ["nondp", "bk"],
    "byo-global-rng-batch": ["nondp", "opacus-ghost"],
}
CASES = [(name, method) for name, methods in METHODS_RUN.items() for method in methods]


@pytest.fixture(scope="module")
def records():
    """run_case for the contract breakers (batch 4, CPU) and one conforming workload."""
    specs = {case: CaseSpec(*case, 4, "cpu") for case in [*CASES, ("byo-conforming", "nondp")]}
    with registered(mlp_workload("byo-conforming"), *CONTRACT_BREAKERS.values()):
        done = run_cpu_cases(specs.values(), cpu_config())
    return {case: done[spec] for case, spec in specs.items()}


@pytest.mark.parametrize("name, method", CASES)
def test_a_broken_contract_is_one_error_line_for_every_method(records, name, method):
    record = records[name, method]
    expected = f"WorkloadContractError: workload '{name}': {BROKEN_RULE[name]}"
    assert record.status == "error", record.reason
    assert record.reason.startswith(expected) and record.reason.endswith(SEE), record.reason
    assert "\n" not in record.reason
    # the same line for every method: it is the workload's bug, not the method's
    assert record.reason == records[name, "nondp"].reason
    assert record.memory.peak_tensor_bytes is None  # refused before any step ran


def test_a_conforming_workload_runs(records):
    record = records["byo-conforming", "nondp"]
    assert record.status == "ok" and record.memory.peak_tensor_bytes > 0, record.reason


def test_the_meta_device_checks_shapes_but_compares_no_values():
    # Meta tensors have no values: dropout cannot be seen there, a wrong loss shape still can.
    dropout = CONTRACT_BREAKERS["byo-dropout"]
    check_workload_contract(dropout, dropout.build_model("meta"), "meta")
    scalar = CONTRACT_BREAKERS["byo-scalar-loss"]
    with pytest.raises(WorkloadContractError, match=r"loss_fn returned shape \(\)"):
        check_workload_contract(scalar, scalar.build_model("meta"), "meta")


def test_the_check_runs_once_per_workload_and_device_and_keeps_the_global_rng(monkeypatch):
    calls = []
    real = contract._broken_rule
    monkeypatch.setattr(contract, "_broken_rule", lambda *args: calls.append(args[2]) or real(*args))
    dropout = mlp_workload("byo-dropout-once", model_fn=CONTRACT_BREAKERS["byo-dropout"].model_fn)
    model = dropout.build_model()
    state = torch.random.get_rng_state()
    for _ in range(2):
        with pytest.raises(WorkloadContractError, match="different outputs"):
            check_workload_contract(dropout, model, "cpu")
    assert calls == [torch.device("cpu")]  # the second call reused the verdict
    assert torch.equal(torch.random.get_rng_state(), state)  # the two dropout forwards drew from a forked RNG


def test_every_builtin_tiny_workload_keeps_the_contract():
    from models.catalog import TINY_WORKLOADS

    for name in TINY_WORKLOADS:
        workload = models.get_workload(name)
        check_workload_contract(workload, workload.build_model(), "cpu")
