"""Expert placement (EPLB's policies) against hand-worked cases, and its invariants on random loads."""

import pytest
import torch

from seekforge.engine.expert_placement import contiguous, imbalance, rebalance
from seekforge.errors import ConfigError


def test_global_policy_hand_case():
    # 4 experts, 6 slots on 2 ranks: the two spare slots go to expert 0 (10 -> 5 -> 3.33 a copy). Packing,
    # heaviest first into the lightest rank with room: 0, 0', 0'' alternate r0 r1 r0, then the three 1-loads fill
    # r1 until full and the last goes to r0: r0 = 2 * 10/3 + 1, r1 = 10/3 + 2. No 3 + 3 split does better.
    load = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    p = rebalance(load, slots=6, ranks=2)
    assert p.policy == "hierarchical"  # one group on one node: auto's hierarchical is the global placement
    assert p.replicas.tolist() == [[3, 1, 1, 1]]
    assert sorted(p.rank_loads(load)[0].tolist()) == pytest.approx([10 / 3 + 2, 20 / 3 + 1])
    assert imbalance(contiguous(4, 2).rank_loads(load)).item() == pytest.approx(11 / 6.5)
    assert imbalance(p.rank_loads(load)).item() == pytest.approx((20 / 3 + 1) / 6.5)
    assert torch.equal(rebalance(load, 6, 2, policy="global").physical_to_logical, p.physical_to_logical)


def test_hierarchical_policy_hand_case():
    # 8 experts in 4 groups of 2 (group loads 8, 2, 8, 2) on 2 nodes of 2 ranks, 12 slots (6 a node, 3 a rank).
    # Groups to nodes: 0 -> n0, 2 -> n1, 1 -> n0 (tie), 3 -> n1. Node 0 (experts 0..3, loads 8 0 1 1) gives both
    # spares to expert 0 (8 -> 4 -> 2.67); node 1 (4 4 1 1) one each to experts 4 and 5. Node 0's ranks:
    # {0, 0, 1} = 16/3 and {0, 2, 3} = 14/3; node 1's: {4, 4, 6} = 5 and {5, 5, 7} = 5.
    load = torch.tensor([[8.0, 0.0, 1.0, 1.0, 4.0, 4.0, 1.0, 1.0]])
    p = rebalance(load, slots=12, ranks=4, groups=4, nodes=2)
    assert p.policy == "hierarchical"
    assert p.replicas.tolist() == [[3, 1, 1, 1, 2, 2, 1, 1]]
    ranks = p.rank_loads(load)[0].tolist()
    assert sorted(ranks[:2]) == pytest.approx([14 / 3, 16 / 3]) and ranks[2:] == pytest.approx([5.0, 5.0])
    assert imbalance(contiguous(8, 4).rank_loads(load)).item() == pytest.approx(8 / 5)
    assert imbalance(p.rank_loads(load)).item() == pytest.approx((16 / 3) / 5)
    node_of_slot = p.rank_of_slot() // 2
    assert set(p.physical_to_logical[0, node_of_slot == 0].tolist()) == {0, 1, 2, 3}
    assert set(p.physical_to_logical[0, node_of_slot == 1].tolist()) == {4, 5, 6, 7}


@pytest.mark.parametrize("experts,slots,ranks,groups,nodes,policy", [
    (16, 20, 4, 4, 2, "hierarchical"), (16, 24, 8, 8, 4, "auto"), (64, 72, 8, 8, 1, "auto"),
    (16, 20, 4, 4, 2, "global"), (12, 16, 4, 3, 2, "auto"),
])
def test_invariants_on_random_loads(experts, slots, ranks, groups, nodes, policy):
    g = torch.Generator().manual_seed(experts * slots + ranks)
    # skewed loads, as a router's: a few hot experts, some idle
    load = (torch.rand(5, experts, generator=g) ** 4 * 1000).round()
    load[0, : experts // 2] = 0
    p = rebalance(load, slots, ranks, groups, nodes, policy)
    assert p.physical_to_logical.shape == (5, slots)
    assert (p.replicas >= 1).all(), "every logical expert placed at least once"
    assert (p.replicas.sum(1) == slots).all(), "copies fill exactly the physical slots"
    for layer in range(5):
        counts = torch.bincount(p.physical_to_logical[layer], minlength=experts)
        assert torch.equal(counts, p.replicas[layer])
    l2p = p.logical_to_physical()
    for layer in range(5):
        for e in range(experts):
            slots_of_e = l2p[layer, e][l2p[layer, e] >= 0]
            assert len(slots_of_e) == p.replicas[layer, e]
            assert (p.physical_to_logical[layer, slots_of_e] == e).all()
    assert p.slots_per_rank * ranks == slots and torch.bincount(p.rank_of_slot()).eq(slots // ranks).all()
    loads = p.rank_loads(load)
    assert torch.allclose(loads.sum(1), load.double().sum(1))  # copies split load, never lose or make any
    before = imbalance(contiguous(experts, ranks, 5).rank_loads(load))
    assert (imbalance(loads) <= before + 1e-9).all()
    if p.policy == "hierarchical":  # a group's experts, and all their copies, within one node
        per_group, ranks_per_node = experts // groups, ranks // nodes
        node_of_slot = p.rank_of_slot() // ranks_per_node
        for layer in range(5):
            node_of_group: dict[int, set] = {}
            for slot, e in enumerate(p.physical_to_logical[layer].tolist()):
                node_of_group.setdefault(e // per_group, set()).add(int(node_of_slot[slot]))
            assert all(len(n) == 1 for n in node_of_group.values())


def test_groups_not_divisible_by_nodes_fall_back_to_global():
    load = torch.rand(2, 12)
    assert rebalance(load, 16, 4, groups=3, nodes=2).policy == "global"
    with pytest.raises(ConfigError, match="groups do not split evenly over 2 nodes"):
        rebalance(load, 16, 4, groups=3, nodes=2, policy="hierarchical")


@pytest.mark.parametrize("kwargs,match", [
    (dict(slots=6), "cannot hold 8 experts"),
    (dict(slots=10), "do not split evenly over 4 ranks"),
    (dict(slots=12, groups=3), "do not split into 3 equal groups"),
    (dict(slots=12, nodes=3), "4 ranks do not split evenly over 3 nodes"),
    (dict(slots=12, policy="best"), "unknown placement policy"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        rebalance(torch.ones(1, 8), ranks=4, **kwargs)


def test_bad_load_is_refused():
    with pytest.raises(ConfigError, match=r"\[layers, experts\]"):
        rebalance(torch.ones(8), 8, 2)
    with pytest.raises(ConfigError, match="non-negative"):
        rebalance(-torch.ones(1, 8), 8, 2)
