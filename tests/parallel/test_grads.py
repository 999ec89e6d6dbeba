"""Gradient clipping over DTensors of several meshes and plain tensors: the global norm of the whole gradients."""

import torch

from dist_harness import run_ranks


def _clip(max_norm):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from seekforge.parallel.grads import clip_grad_norm_

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same whole tensors on every rank
    whole = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    grads = [torch.randn_like(w) for w in whole]
    dense = init_device_mesh("cpu", (2,))  # FSDP's shards of one mesh, a replicated DTensor on another, a plain
    other = init_device_mesh("cpu", (2,))
    params = [distribute_tensor(whole[0], dense, [Shard(0)]), distribute_tensor(whole[1], other, [Replicate()]),
              whole[2].clone()]
    for p, g, place in zip(params, grads, [(dense, [Shard(0)]), (other, [Replicate()]), None]):
        p.grad = g.clone() if place is None else distribute_tensor(g, *place)
    norm = clip_grad_norm_(params, max_norm)
    return norm, [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for p in params]


def test_clipping_takes_the_global_norm_over_meshes():
    torch.manual_seed(0)
    whole = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    params = [torch.nn.Parameter(w) for w in whole]
    for p in params:
        p.grad = torch.randn_like(p)
    want = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    for norm, grads in run_ranks(_clip, 2, max_norm=1.0):
        assert abs(norm - want) < 1e-5 * want
        for g, p in zip(grads, params):
            torch.testing.assert_close(g, p.grad)
