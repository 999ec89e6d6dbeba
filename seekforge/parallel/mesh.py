"""The process group and device meshes of a distributed run, from torchrun's environment.

A run launched by torchrun (WORLD_SIZE > 1) joins the default process group, NCCL on CUDA (LOCAL_RANK picks
the GPU) and gloo on the CPU, and builds its meshes over the resolved layout (`ParallelConfig`), every rank
laid out row-major in the order of the dims below. A world of one needs neither: `setup` returns no mesh and
training runs as a plain single-process run.

Two meshes over the same ranks, so that each kind of parameter's DTensors share one root mesh (FSDP2 composes
with tensor or expert parallelism only on one root):
- `sparse` ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp"): the routed experts'. A rank's experts are
  its ep coordinate's; they are sharded (FSDP2) over ("dp_replicate", "dp_shard_mod_ep"), the ranks holding
  the same experts;
- `dense` ("pp", "dp_replicate", "dp_shard", "tp"), dp_shard = dp_shard_mod_ep x ep: everything else's,
  sharded over ("dp_replicate", "dp_shard") (HSDP when dp_replicate > 1), "tp" its tensor-parallel dim;
- `dp`, flattened from `dense`: every data-parallel rank (dp_replicate x dp_shard, ep included). They see
  different rows of each batch; what is summed or averaged over the data (losses, expert load, evaluation)
  is reduced over it.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from seekforge.errors import SeekforgeError
from seekforge.parallel.config import ParallelConfig

SPARSE_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
WORLD_NAME = "the world size (torchrun's WORLD_SIZE; 1 without torchrun)"


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the run's files and prints: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def on_main(fn, error: type[SeekforgeError] = SeekforgeError):
    """fn() on rank 0 (or the only process), its result (picklable) handed to every rank. A failure there
    raises on rank 0 and `error` naming it on the others, so that no rank waits for a failed one."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as err:
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise error(f"rank 0 failed: {value}")
    return value


def main_first(fn):
    """fn() on rank 0, then on the other ranks, which so find what rank 0 made (a generated dataset); fn's
    result on each rank."""
    if not dist.is_initialized():
        return fn()
    made = []
    on_main(lambda: made.append(fn()))
    return made[0] if made else fn()


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (once); returns this rank's device: on CUDA the GPU LOCAL_RANK names."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Mesh:
    """A distributed run's meshes (see the module doc) and its resolved layout."""

    layout: ParallelConfig
    sparse: DeviceMesh
    dense: DeviceMesh
    dp: DeviceMesh

    @property
    def fsdp(self) -> DeviceMesh:
        """What FSDP2 shards the dense parameters over: ("dp_replicate", "dp_shard") for HSDP, else "dp_shard"."""
        return self.dense["dp_replicate", "dp_shard"] if self.layout.dp_replicate > 1 else self.dense["dp_shard"]

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """What FSDP2 shards the routed experts over: the ranks that hold the same experts."""
        if self.layout.dp_replicate > 1:
            return self.sparse["dp_replicate", "dp_shard_mod_ep"]
        return self.sparse["dp_shard_mod_ep"]

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the data-parallel ranks, in place; returns it."""
        dist.all_reduce(tensor, group=self.dp.get_group())
        return tensor

    def dp_max(self, value: int) -> int:
        """The largest `value` over the data-parallel ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=self.dp.device_type)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp.get_group())
        return int(t.item())

    def dp_gather(self, obj) -> list:
        """`obj` (picklable) of every data-parallel rank, in dp_rank order."""
        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp.get_group())
        return out

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global batch: the dp_rank-th of dp_size near-equal slices (empty where the batch
        has fewer rows than ranks)."""
        return {k: v.tensor_split(self.dp_size)[self.dp_rank] for k, v in batch.items()}

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` holds on every rank (so that all ranks take the same branch)."""
        t = torch.tensor([0.0 if flag else 1.0], device=device)
        dist.all_reduce(t)
        return not t.item()


def build_mesh(layout: ParallelConfig, device_type: str) -> Mesh:
    """The meshes of a resolved `layout` (dp_shard filled in) over the default process group."""
    p = layout
    sparse = init_device_mesh(device_type, (p.pp, p.dp_replicate, p.dp_shard // p.ep, p.ep, p.tp),
                              mesh_dim_names=SPARSE_DIMS)
    dense = init_device_mesh(device_type, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DENSE_DIMS)
    dp = dense["dp_replicate", "dp_shard"]._flatten("dp")
    return Mesh(layout, sparse, dense, dp)


def setup(layout: ParallelConfig, device: torch.device) -> tuple[ParallelConfig, torch.device, Mesh | None]:
    """Resolve `layout` against the world size (a clear error where the degrees do not multiply to it), join the
    process group and build the meshes when there is more than one rank. Returns (the resolved layout, this
    rank's device, the meshes or None for a single process)."""
    world = world_size()
    layout = layout.resolve(world, world_name=WORLD_NAME)
    if world == 1:
        return layout, device, None
    device = init_distributed(device)
    return layout, device, build_mesh(layout, device.type)
