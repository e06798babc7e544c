"""jax-privacy with a microbatch size (``jax-privacy:microbatch=K``) computes the same clipped sum as the
per-sample loop: the chunks change the order of work, not the result (1e-4 relative error in global norm, at the
median per-sample norm so that some samples clip and some do not)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
pytest.importorskip("jax_privacy", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")

import models
from bench.dp import MethodUnsupported, clipped_grad_sum
from bench.dp.__main__ import per_sample_norms, relative_error

BATCH = 6


@pytest.mark.parametrize("microbatch", [2, 3])
@pytest.mark.parametrize("name", ["dit-tiny-cond", "gpt-tiny"])
def test_the_microbatched_clipped_sum_is_the_reference(name, microbatch):
    workload = models.get_workload(name)
    model = workload.build_model()
    batch = workload.make_batch(BATCH, generator=torch.Generator().manual_seed(3))
    norms = per_sample_norms(workload, model, batch)
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()  # some samples clip, some do not
    reference = clipped_grad_sum("microbatch", workload, model, batch, clip)
    got = clipped_grad_sum(f"jax-privacy:microbatch={microbatch}", workload, model, batch, clip)
    assert relative_error(got, reference) <= 1e-4


def test_a_microbatch_that_does_not_divide_the_batch_is_refused():
    workload = models.get_workload("gpt-tiny")
    model = workload.build_model()
    with pytest.raises(MethodUnsupported, match="microbatch size 4 does not divide batch size 6"):
        clipped_grad_sum("jax-privacy:microbatch=4", workload, model, workload.make_batch(BATCH), math.inf)
