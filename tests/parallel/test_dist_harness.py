"""The multi-process harness itself: ranks see torchrun's environment and gloo collectives work."""

import pytest
import torch

from dist_harness import run_ranks


def _all_reduce(value):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(value) * (dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), float(t)


def _fail():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("rank one fails on purpose")
    return 0


def test_ranks_share_a_gloo_group():
    # sum over ranks r of 2 * (r + 1) for 3 ranks = 2 * 6
    assert run_ranks(_all_reduce, 3, value=2) == [(0, 3, 12.0), (1, 3, 12.0), (2, 3, 12.0)]


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(AssertionError, match="rank one fails on purpose"):
        run_ranks(_fail, 2, timeout=60)
