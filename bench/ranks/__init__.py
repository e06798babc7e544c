"""Cases on many ranks: torchrun launches ``world_size`` processes, each measures its own step, one record.

* :mod:`bench.ranks.launch` — the pytest case's side: writes the :class:`~bench.ranks.job.RankJob`, runs
  ``python -m torch.distributed.run ... -m bench.ranks.worker`` with a timeout, merges the ranks' records;
* :mod:`bench.ranks.worker` — what torchrun runs on each rank: process group (nccl with one GPU per rank, gloo
  on CPU), then :func:`bench.ranks.step.run_rank`;
* :mod:`bench.ranks.step` — one rank's case: model, this rank's share of the global batch, the parallel step
  (:mod:`bench.dp.parallel`), warm-up, measured round, timed rounds;
* :mod:`bench.ranks.predict` — the same rank step under FakeTensorMode with a fake process group: the per-rank
  tensor bytes of any world size, in one process, without the ranks (``python -m bench.ranks.predict``).
"""
