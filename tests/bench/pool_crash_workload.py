"""A bring-your-own workload whose forward ends its process (``os._exit(3)``), as a crash inside a library would:
loaded by the meta worker processes of tests/bench/test_pool.py (``--workload-module``), never by the test
process itself."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

import models
from models import Batch, Workload


class ExitingLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        os._exit(3)


models.register_workload(
    Workload(
        name="pool-crash",
        model_fn=lambda: ExitingLinear(3, 2),
        batch_fn=lambda b, g: Batch((torch.randn(b, 3, generator=g),), torch.randn(b, 2, generator=g)),
        loss_fn=lambda out, target: (out - target).pow(2).mean(dim=1),
        input_names=("x",),
    )
)
