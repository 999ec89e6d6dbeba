"""Expert placement for expert-parallel serving: redundant copies of hot experts, packed onto ranks.

Our own implementation of the algorithm DeepSeek published as EPLB (github.com/deepseek-ai/EPLB). Given each MoE
layer's tokens per expert over a workload, it fills `slots` physical expert slots (the logical experts plus
`slots - experts` redundant copies) spread evenly over `ranks` expert-parallel ranks, so that the busiest rank's
load comes close to the mean. A token routed to an expert with r copies is assumed to go to each copy with
probability 1/r, so each copy carries load / r.

- Replication: every expert gets one slot; each further slot goes to the expert whose copies now carry the most
  (load / copies), one at a time.
- Packing: items (copies) sorted by load, heaviest first, each to the least-loaded pack that still has room;
  every pack takes the same number of items.
- The hierarchical policy (for group-limited routing: a token's experts lie within a few groups) first packs whole
  expert groups onto nodes, then replicates each node's experts within that node's slots and packs the copies
  onto the node's ranks: a group's experts and all their copies stay in one node, so a token's dispatch crosses
  few nodes. The global policy replicates over all experts and packs onto all ranks, ignoring groups.

No expert-parallel serving exists in seekforge yet: `bench/eplb.py` applies placements in simulation only (the load
each rank would carry), on expert load the engine recorded over a workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekforge.errors import ConfigError

POLICIES = ("auto", "hierarchical", "global")


@dataclass
class Placement:
    """Where each layer's physical expert slots point. Slots [r * per_rank, (r + 1) * per_rank) live on rank r;
    in the hierarchical policy, ranks [n * ranks_per_node, (n + 1) * ranks_per_node) form node n."""

    physical_to_logical: torch.Tensor  # [layers, slots] long: the logical expert each slot holds
    replicas: torch.Tensor  # [layers, experts] long: copies of each logical expert
    ranks: int
    policy: str  # "hierarchical" or "global": the one that made it

    @property
    def slots_per_rank(self) -> int:
        return self.physical_to_logical.shape[1] // self.ranks

    def rank_of_slot(self) -> torch.Tensor:
        """[slots] long: the rank each slot lives on."""
        return torch.arange(self.physical_to_logical.shape[1]) // self.slots_per_rank

    def logical_to_physical(self) -> torch.Tensor:
        """[layers, experts, max copies] long: the slots of each logical expert, in slot order, padded with -1."""
        layers, experts = self.replicas.shape
        out = torch.full((layers, experts, int(self.replicas.max())), -1, dtype=torch.long)
        for layer, row in enumerate(self.physical_to_logical.tolist()):
            filled = [0] * experts
            for slot, expert in enumerate(row):
                out[layer, expert, filled[expert]] = slot
                filled[expert] += 1
        return out

    def rank_loads(self, load: torch.Tensor) -> torch.Tensor:
        """load [layers, experts] -> [layers, ranks]: what each rank carries, each copy taking load / copies."""
        per_copy = load.double() / self.replicas.double()
        per_slot = per_copy.gather(1, self.physical_to_logical)
        return per_slot.view(per_slot.shape[0], self.ranks, -1).sum(-1)


def contiguous(experts: int, ranks: int, layers: int = 1) -> Placement:
    """The placement without redundancy: experts [r * experts / ranks, (r + 1) * experts / ranks) on rank r,
    what expert parallelism does before any rebalancing."""
    if experts % ranks:
        raise ConfigError(f"{experts} experts do not split evenly over {ranks} ranks: choose ranks dividing it")
    return Placement(torch.arange(experts).repeat(layers, 1), torch.ones(layers, experts, dtype=torch.long), ranks,
                     "global")


def imbalance(rank_loads: torch.Tensor) -> torch.Tensor:
    """[layers, ranks] -> [layers]: the busiest rank's load over the mean rank's (1 = balanced; a layer with
    no load counts as balanced)."""
    mean = rank_loads.mean(-1)
    return torch.where(mean > 0, rank_loads.amax(-1) / mean.clamp(min=torch.finfo(mean.dtype).tiny), 1.0)


def rebalance(load: torch.Tensor, slots: int, ranks: int, groups: int = 1, nodes: int = 1,
              policy: str = "auto") -> Placement:
    """A placement of load [layers, experts] (tokens per expert, each layer on its own) into `slots` physical
    slots over `ranks` ranks. `groups`: the router's expert groups; `nodes`: the nodes the ranks span.
    policy "auto" is hierarchical where the nodes divide the groups (as EPLB chooses), global otherwise."""
    if load.dim() != 2:
        raise ConfigError(f"expert load must be [layers, experts], got shape {tuple(load.shape)}")
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ConfigError("expert load must be finite and non-negative token counts")
    if policy not in POLICIES:
        raise ConfigError(f"unknown placement policy {policy!r}: choose one of {', '.join(POLICIES)}")
    experts = load.shape[1]
    if slots < experts:
        raise ConfigError(f"{slots} physical slots cannot hold {experts} experts: slots = experts + redundant copies")
    if ranks < 1 or slots % ranks:
        raise ConfigError(f"{slots} physical slots do not split evenly over {ranks} ranks: choose a redundant count "
                          f"that makes experts + redundant a multiple of the ranks")
    if groups < 1 or experts % groups:
        raise ConfigError(f"{experts} experts do not split into {groups} equal groups")
    if nodes < 1 or ranks % nodes:
        raise ConfigError(f"{ranks} ranks do not split evenly over {nodes} nodes")
    if policy == "auto":
        policy = "hierarchical" if groups % nodes == 0 else "global"
    if policy == "hierarchical" and groups % nodes:
        raise ConfigError(f"the hierarchical policy packs whole groups onto nodes: {groups} groups do not split "
                          f"evenly over {nodes} nodes (use policy='global')")
    if policy == "global":
        groups = nodes = 1
    rows = [_place_layer(row, slots, ranks, groups, nodes) for row in load.double().tolist()]
    p2l = torch.tensor(rows, dtype=torch.long).view(len(rows), slots)
    replicas = torch.zeros(len(rows), experts, dtype=torch.long).scatter_add_(1, p2l, torch.ones_like(p2l))
    return Placement(p2l, replicas, ranks, policy)


def _place_layer(load: list[float], slots: int, ranks: int, groups: int, nodes: int) -> list[int]:
    """One layer's slot -> logical expert: groups packed onto nodes, then within each node its experts replicated
    into the node's slots and the copies packed onto the node's ranks (one node and one group: the global policy)."""
    per_group = len(load) // groups
    group_load = [sum(load[g * per_group:(g + 1) * per_group]) for g in range(groups)]
    node_groups = _pack(group_load, nodes)
    slots_per_node, ranks_per_node = slots // nodes, ranks // nodes
    per_rank = slots // ranks
    out = [0] * slots
    for node, members in enumerate(node_groups):
        experts = [g * per_group + e for g in members for e in range(per_group)]
        copy_of = _replicate([load[e] for e in experts], slots_per_node)
        counts = [copy_of.count(i) for i in range(len(experts))]
        copy_load = [load[experts[i]] / counts[i] for i in copy_of]
        for rank, copies in enumerate(_pack(copy_load, ranks_per_node)):
            base = node * slots_per_node + rank * per_rank
            for position, copy in enumerate(copies):
                out[base + position] = experts[copy_of[copy]]
    return out


def _replicate(load: list[float], slots: int) -> list[int]:
    """Slot -> item for `slots` >= len(load) slots: one slot each, then each further slot to the item whose copies
    carry the most (load / copies; the lower index on a tie)."""
    copies = [1] * len(load)
    owner = list(range(len(load)))
    for _ in range(slots - len(load)):
        hot = max(range(len(load)), key=lambda i: (load[i] / copies[i], -i))
        copies[hot] += 1
        owner.append(hot)
    return owner


def _pack(weights: list[float], packs: int) -> list[list[int]]:
    """Items into `packs` packs of len(weights) / packs items each, heaviest item first, each to the lightest pack
    with room (the lower index on a tie). Returns each pack's items, in the order they went in."""
    cap = len(weights) // packs
    members: list[list[int]] = [[] for _ in range(packs)]
    totals = [0.0] * packs
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        pack = min((p for p in range(packs) if len(members[p]) < cap), key=lambda p: (totals[p], p))
        members[pack].append(item)
        totals[pack] += weights[item]
    return members
