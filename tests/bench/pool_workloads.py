"""Bring-your-own workloads for the meta worker processes of tests/bench/test_pool.py (``--workload-module``; never
loaded by the test process itself): one whose forward ends its process (``os._exit(3)``), as a crash inside a
library would, and one whose forward warns."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

import models
from models import Batch, Workload


class ExitingLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        os._exit(3)


class WarningLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        warnings.warn("pool-warns: forward ran in a worker", UserWarning, stacklevel=1)
        return super().forward(x)


for name, model in (("pool-crash", ExitingLinear), ("pool-warns", WarningLinear)):
    models.register_workload(
        Workload(
            name=name,
            model_fn=lambda model=model: model(3, 2),
            batch_fn=lambda b, g: Batch((torch.randn(b, 3, generator=g),), torch.randn(b, 2, generator=g)),
            loss_fn=lambda out, target: (out - target).pow(2).mean(dim=1),
            input_names=("x",),
        )
    )
