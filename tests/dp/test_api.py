"""The DP registry's public API on bad input, privacy resolution (unreachable budgets included), phase marks,
clean-up of Opacus wrappers and the diagnoses of its refusals."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

import models
from bench import dp
from bench.config.cli import pytest_bench_command
from bench.dp import DPConfigError, MethodUnsupported
from bench.dp.__main__ import median_sample_norm
from bench.dp.diagnose import FIX_777, diagnose, params_without_grad_sampler, tied_parameters

from .custom_workloads import mlp_workload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPECTED_METHODS = [
    "nondp",
    "opacus-hooks",
    "opacus-functorch",
    "opacus-ew",
    "opacus-ghost",
    "torch-func",
    "microbatch",
]


@pytest.fixture(scope="module")
def gpt():
    workload = models.get_workload("gpt-tiny", tie_weights=False)
    return workload, workload.build_model(), workload.make_batch(3)


def test_registry_order_is_display_order():
    names = dp.available_methods()
    assert [n for n in names if n in EXPECTED_METHODS] == EXPECTED_METHODS
    assert names[0] == "nondp" and names[-1] == "microbatch"


def test_unknown_method_lists_the_valid_names(gpt):
    workload, model, batch = gpt
    with pytest.raises(DPConfigError) as info:
        dp.clipped_grad_sum("opacus-hoks", workload, model, batch, 1.0)
    message = str(info.value)
    assert "\n" not in message and "did you mean opacus-hooks" in message
    assert all(name in message for name in dp.available_methods())
    with pytest.raises(DPConfigError, match="unknown DP method 'sgd'"):
        dp.build_step("sgd", workload, model, privacy=dp.resolve_privacy(1.0, accountant="rdp"), batch_size=2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_clip_norm_is_refused(gpt, bad):
    workload, model, batch = gpt
    with pytest.raises(DPConfigError, match="max_grad_norm must be > 0"):
        dp.clipped_grad_sum("microbatch", workload, model, batch, bad)
    with pytest.raises(DPConfigError, match="max_grad_norm must be > 0"):
        dp.resolve_privacy(bad)


def test_infinite_clip_norm_is_only_for_gradient_sums(gpt):
    workload, model, batch = gpt
    assert dp.clipped_grad_sum("torch-func", workload, model, batch, math.inf)  # Σ_i g_i
    with pytest.raises(DPConfigError):
        dp.resolve_privacy(math.inf)  # a step needs a finite C (the noise is σ·C)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_multiplier=-0.5), "noise multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=float("nan")), "noise multiplier"),
        (dict(target_epsilon=0.0), "target epsilon must be a finite number > 0"),
        (dict(target_epsilon=-3.0), "target epsilon"),
        (dict(target_epsilon=math.inf), "target epsilon"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "not both"),
        (dict(accountant="moments"), "unknown accountant"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(target_delta=1.0), "delta"),
    ],
)
def test_bad_privacy_settings_are_refused(kwargs, match):
    with pytest.raises(DPConfigError, match=match):
        dp.resolve_privacy(1.0, **kwargs)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_target_epsilon_resolves_sigma_with_opacus_and_back(accountant):
    privacy = dp.resolve_privacy(1.0, target_epsilon=3.0, sample_rate=0.01, steps=500, accountant=accountant)
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500, accountant=accountant
    )
    assert privacy.noise_multiplier == pytest.approx(sigma, rel=1e-12)
    assert 0.3 < privacy.noise_multiplier < 5  # a plausible σ for ε = 3 at q = 0.01, 500 steps
    # The reverse direction from that σ lands on the target (Opacus searches σ to within ε tolerance 0.01).
    assert privacy.epsilon == pytest.approx(3.0, abs=0.05)
    assert privacy.epsilon <= 3.0 + 1e-9
    # ... and a larger σ means a smaller ε
    assert (
        dp.resolve_privacy(1.0, noise_multiplier=2 * sigma, sample_rate=0.01, steps=500, accountant=accountant).epsilon
        < privacy.epsilon
    )


def test_sigma_gives_epsilon_and_zero_sigma_is_not_private():
    privacy = dp.resolve_privacy(0.5, noise_multiplier=1.0, sample_rate=0.01, steps=1000, accountant="rdp")
    accountant = create_accountant(mechanism="rdp")
    accountant.history = [(1.0, 0.01, 1000)]
    assert privacy.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert privacy.to_dict()["max_grad_norm"] == 0.5
    assert dp.resolve_privacy(1.0, noise_multiplier=0.0).epsilon == math.inf


def test_bad_batch_size_and_optimizer_are_refused(gpt):
    workload, model, _ = gpt
    privacy = dp.resolve_privacy(1.0, accountant="rdp")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(DPConfigError, match="batch size"):
            dp.build_step("torch-func", workload, model, privacy=privacy, batch_size=bad)
    with pytest.raises(DPConfigError, match="unknown optimizer"):
        dp.build_step("torch-func", workload, model, privacy=privacy, batch_size=2, optimizer="lion")


def test_unsupported_model_raises_never_falls_back():
    workload = models.get_workload("gpt-tiny")  # tied wte / lm_head
    model = workload.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MethodUnsupported) as info:
        dp.build_step("opacus-ghost", workload, model, privacy=dp.resolve_privacy(1.0, accountant="rdp"), batch_size=2)
    assert info.value.method == "opacus-ghost"
    assert info.value.reason == "NotImplementedError: Parameter tying is not supported with Ghost Clipping"
    assert "tie_weights=False" in info.value.diagnosis
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", EXPECTED_METHODS)
def test_step_marks_every_phase_and_close_leaves_a_plain_module(gpt, method):
    workload, _, batch = gpt
    model = workload.build_model()
    privacy = dp.resolve_privacy(1.0, noise_multiplier=1.0, accountant="rdp")
    step = dp.build_step(
        method, workload, model, privacy=privacy, batch_size=batch.batch_size, optimizer="adamw", lr=1e-3
    )
    marks: list[str] = []
    for _ in range(2):  # a second step must work too (Opacus' per-step state is reset)
        marks.clear()
        loss = step(batch, marks.append)
    assert loss.shape == () and torch.isfinite(loss)
    assert marks[-1] == "end" and marks.count("end") == 1
    assert list(dict.fromkeys(marks)) == [*dp.PHASES, "end"]
    step.close()
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    # the same model can be wrapped again by another method afterwards
    assert dp.clipped_grad_sum("opacus-hooks", workload, model, batch, 1.0)


def test_diagnose_finds_parameters_outside_grad_samplers():
    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
            self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3))

    outer = torch.nn.Sequential(Owner())
    assert params_without_grad_sampler(outer) == [("0", "scale")]
    text = diagnose("opacus-hooks", None, outer, TypeError("forward() missing 1 required positional argument"))
    assert "'0'" in text and "'scale'" in text and FIX_777 in text


def test_tied_parameters_are_found():
    assert tied_parameters(models.get_workload("gpt-tiny").build_model()) == [["lm_head.weight", "wte.weight"]]
    assert tied_parameters(models.get_workload("gpt-tiny", tie_weights=False).build_model()) == []


# ---------------------------------------------------------------------------------------------------------------
# ghost clipping's "Parameter tying" refusal: a layer called twice is named as such, a real tie as a tie


class _LayerCalledTwice(torch.nn.Module):
    """One Linear applied twice per forward, as diffusers' DiT runs block 0's embedder again for its final layer."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.head(self.shared(h))


def test_ghost_refusal_names_the_layer_called_twice():
    workload = mlp_workload("byo-layer-called-twice", model_fn=_LayerCalledTwice)
    model, batch = workload.build_model(), workload.make_batch(4)
    with pytest.raises(MethodUnsupported) as info:
        dp.clipped_grad_sum("opacus-ghost", workload, model, batch, 1.0)
    assert info.value.reason == "NotImplementedError: Parameter tying is not supported with Ghost Clipping"
    assert info.value.diagnosis.startswith("byo-layer-called-twice calls layer 'shared' (Linear) 2 times per forward")
    assert "ties" not in info.value.diagnosis
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # the probe's hooks are gone
    # ... while Book-Keeping sums both calls' contributions, cross terms included: it matches the per-sample loop
    clip = median_sample_norm(workload, model, batch)  # some samples clipped, some not
    ref = dp.clipped_grad_sum("microbatch", workload, model, batch, clip)
    got = dp.clipped_grad_sum("bk", workload, model, batch, clip)
    difference = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
    assert difference.norm() <= 1e-4 * torch.cat([r.flatten() for r in ref.values()]).norm()


def test_ghost_refusal_of_a_real_tie_names_the_tie():
    workload = models.get_workload("gpt-tiny")
    with pytest.raises(MethodUnsupported) as info:
        dp.clipped_grad_sum("opacus-ghost", workload, workload.build_model(), workload.make_batch(2), 1.0)
    assert info.value.diagnosis.startswith("gpt-tiny ties lm_head.weight = wte.weight")
    assert "times per forward" not in info.value.diagnosis


# ---------------------------------------------------------------------------------------------------------------
# privacy budgets the accountant cannot certify: one line naming the option, the floor and Opacus' own words


def _floor(accountant: str) -> float:
    """ε the accountant gives at Opacus' largest searched σ (its floor: no σ certifies less)."""
    from opacus.accountants.utils import MAX_SIGMA

    acc = create_accountant(mechanism=accountant)
    acc.history = [(MAX_SIGMA, 0.01, 1000)]
    return acc.get_epsilon(delta=1e-5)


@pytest.mark.parametrize("accountant, target", [("prv", 1e-3), ("rdp", 0.05)])
def test_an_unreachable_target_epsilon_is_one_line_naming_the_floor(accountant, target):
    floor = _floor(accountant)
    assert floor > target  # the premise: below the accountant's floor
    with pytest.raises(DPConfigError) as info:
        dp.resolve_privacy(1.0, target_epsilon=target, sample_rate=0.01, steps=1000, accountant=accountant)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"target ε {target:g} (--target-epsilon) is unreachable with the {accountant} accountant")
    assert f"certifies only ε = {floor:.3g}" in message and f"raise --target-epsilon above {floor:.3g}" in message
    assert "(Opacus: ValueError: The privacy budget is too low.)" in message


def test_an_epsilon_the_accountant_cannot_compute_is_one_line():
    with pytest.raises(DPConfigError) as info:
        dp.resolve_privacy(1.0, noise_multiplier=1e7, accountant="gdp")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ε of noise multiplier 1e+07 (--noise-multiplier) cannot be")
    assert "(Opacus: ValueError:" in message and "--accountant (valid: prv, rdp, gdp)" in message


def test_bench_refuses_an_unreachable_target_epsilon_with_one_usage_line(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    cmd = pytest_bench_command("--collect-only")
    cmd += ["--target-epsilon", "1e-3", f"--results={tmp_path / 'r.jsonl'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("ERROR: usage:")]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and "target ε 0.001 (--target-epsilon) is unreachable" in errors[0], proc.stderr
    assert "Optimal order is the largest alpha" not in proc.stderr  # Opacus' per-σ warning no longer buries it


def test_opacus_probes_a_model_structure_once_and_again_when_it_changes(monkeypatch):
    """The structural probe (one sample's forward/backward) runs once per model structure, not once per copy: on
    meta at paper size it cost seconds a case. A copy probes no more; a frozen parameter or a tie probes again."""
    import copy

    method = dp.get_method("opacus-hooks")
    workload = models.get_workload("gpt-tiny-untied")
    model = workload.build_model()
    probes = []
    real = type(method).clipped_grad_sum
    monkeypatch.setattr(type(method), "clipped_grad_sum", lambda self, *a, **k: probes.append(1) or real(self, *a, **k))
    method._probed.clear()
    method.check(workload, model)
    method.check(workload, copy.deepcopy(model))
    assert len(probes) == 1
    frozen = copy.deepcopy(model)
    next(frozen.parameters()).requires_grad_(False)
    method.check(workload, frozen)
    tied = copy.deepcopy(model)
    tied.lm_head.weight = tied.wte.weight
    method.check(workload, tied)
    assert len(probes) == 3
