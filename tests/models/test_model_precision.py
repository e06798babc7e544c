"""Pure-bf16 models: every tiny workload trains with its parameters cast to bfloat16, on its fp32 batch."""

from __future__ import annotations

import pytest
import torch

from models import get_workload
from models.catalog import TINY_WORKLOADS
from models.dit import timestep_frequencies


@pytest.mark.parametrize("name", TINY_WORKLOADS)
def test_bf16_model_runs_forward_and_backward_on_an_fp32_batch(name):
    workload = get_workload(name)
    batch = workload.make_batch(4, torch.Generator().manual_seed(0))  # fp32 latents, as every method draws them
    reference = workload.loss_per_sample(workload.build_model()(*batch.inputs), batch.target).detach()

    model = workload.build_model().to(torch.bfloat16)
    out = model(*batch.inputs)
    assert out.dtype == torch.bfloat16
    loss = workload.loss_per_sample(out, batch.target)
    loss.mean().backward()
    assert torch.all(torch.isfinite(loss))
    torch.testing.assert_close(loss.float(), reference, rtol=0.05, atol=0.0)  # bf16 keeps ~3 significant digits
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.dtype == torch.bfloat16, param_name
            assert torch.all(torch.isfinite(param.grad)), param_name


def test_timestep_features_stay_fp32_until_the_embedder():
    t = torch.tensor([0, 500, 999])
    assert timestep_frequencies(t).dtype == torch.float32
    model = get_workload("dit-tiny-uncond").build_model().to(torch.bfloat16)
    seen = []
    model.t_embedder.mlp[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    x_t = torch.randn(3, 4, 8, 8)
    model(x_t, t)
    assert seen == [torch.bfloat16]
