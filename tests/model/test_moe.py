import pytest
import torch
import torch.nn.functional as F

from seekforge import ModelConfig
from seekforge.model.gate import Gate
from seekforge.model.moe import MoE, looped_linear


def _moe(seed=0, **changes):
    cfg = ModelConfig.preset("tiny").replace(**changes)
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return m


def _naive(m: MoE, x):
    """Token by token, expert by expert: the obviously-correct reference."""
    w, idx, _ = m.gate(x)
    out = torch.zeros_like(x)
    e = m.experts
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            k = idx[t, j]
            h = F.silu(x[t] @ e.w1[k].T) * (x[t] @ e.w3[k].T)
            out[t] += w[t, j] * (h @ e.w2[k].T)
    return out + m.shared_experts(x)


def test_grouped_experts_match_naive_loop():
    m = _moe()
    x = torch.randn(23, 128)
    y, routing = m(x)
    torch.testing.assert_close(y, _naive(m, x), atol=1e-5, rtol=1e-5)
    _, indices, scores = m.gate(x)
    assert torch.equal(routing.indices, indices) and torch.equal(routing.scores, scores)
    assert routing.load.tolist() == torch.bincount(indices.flatten(), minlength=m.experts.n_experts).tolist()


def test_fallback_path_matches_grouped_mm(monkeypatch):
    m = _moe(1)
    x = torch.randn(2, 9, 128)
    want = m(x)[0]
    monkeypatch.setattr(m.experts, "matmul", lambda x, weights, offsets, expert_of_row: tuple(
        looped_linear(x, w, expert_of_row) for w in weights))
    torch.testing.assert_close(m(x)[0], want, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_routed_and_gate_weights():
    m = _moe(2)
    x = torch.randn(17, 128, requires_grad=True)
    m(x)[0].square().sum().backward()
    assert m.experts.w1.grad.abs().sum() > 0 and m.gate.weight.grad.abs().sum() > 0 and x.grad is not None


def test_gradients_match_naive_loop():
    """Backward through the sorted rows (their gathers' adjoint gathers) equals autograd through the naive loop."""
    grads = []
    for forward in (lambda m, x: m(x)[0], _naive):
        m = _moe(3)
        x = torch.randn(19, 128, dtype=torch.float64, requires_grad=True)
        m.double()
        (forward(m, x) * torch.linspace(-1, 1, 128, dtype=torch.float64)).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in (m.experts.w1, m.experts.w2, m.experts.w3, m.gate.weight)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_gate_bias_changes_choice_not_weights():
    cfg = ModelConfig.preset("tiny").replace(n_expert_groups=1, n_limited_groups=1, route_scale=1.0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, 0, 0.5)
    x = torch.randn(64, 128)
    w0, i0, scores = gate(x)
    gate.bias[3] = 10.0  # expert 3 is now always chosen
    w1, i1, _ = gate(x)
    assert (i1 == 3).any(dim=1).all()
    # weights are the unbiased scores of the chosen experts, normalised
    chosen = scores.gather(1, i1)
    torch.testing.assert_close(w1, chosen / chosen.sum(1, keepdim=True))


def test_group_limited_selection_by_hand():
    """8 experts in 4 groups of 2, keep 2 groups, pick 2 experts (sigmoid, noaux_tc)."""
    cfg = ModelConfig.preset("tiny").replace(n_expert_groups=4, n_limited_groups=2, route_scale=2.0)
    gate = Gate(cfg)
    # scores (after sigmoid) per expert: groups (0,1) (2,3) (4,5) (6,7)
    target = torch.tensor([0.90, 0.10, 0.60, 0.55, 0.80, 0.05, 0.70, 0.69])
    logits = torch.log(target / (1 - target))
    gate.weight.data.zero_()
    gate.weight.data[:, 0] = logits
    x = torch.zeros(1, 128)
    x[0, 0] = 1.0
    w, idx, _ = gate(x)
    # group sums of top-2: 1.00, 1.15, 0.85, 1.39 -> keep groups 3 and 1 -> experts 6, 7 (0.70, 0.69)
    # although expert 0 (0.90) and 4 (0.80) score higher individually
    assert sorted(idx[0].tolist()) == [6, 7]
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.69, 0.70]) / 1.39 * 2.0)
    # V2's group_limited_greedy scores a group by its best expert: groups 0 (0.90) and 2 (0.80)
    gate_v2 = Gate(cfg.replace(topk_method="group_limited_greedy"))
    gate_v2.weight.data.copy_(gate.weight.data)
    _, idx2, _ = gate_v2(x)
    assert sorted(idx2[0].tolist()) == [0, 4]


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_score_functions(score_func):
    cfg = ModelConfig.preset("tiny").replace(score_func=score_func, norm_topk_prob=False, route_scale=1.0,
                                             n_expert_groups=1, n_limited_groups=1, topk_method="greedy")
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, 0, 0.3)
    x = torch.randn(5, 128)
    w, idx, scores = gate(x)
    logits = x @ gate.weight.T
    want = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(w, want.topk(2).values)


def test_topk_override_by_hand():
    """The hand case above at k = 1 and 3: the groups kept are the same (3 and 1), the k best experts within
    them are taken and their weights normalised over those k."""
    cfg = ModelConfig.preset("tiny").replace(n_expert_groups=4, n_limited_groups=2, route_scale=2.0)
    gate = Gate(cfg)
    target = torch.tensor([0.90, 0.10, 0.60, 0.55, 0.80, 0.05, 0.70, 0.69])
    gate.weight.data.zero_()
    gate.weight.data[:, 0] = torch.log(target / (1 - target))
    x = torch.zeros(1, 128)
    x[0, 0] = 1.0
    w, idx, _ = gate(x, topk=1)
    assert idx.tolist() == [[6]]
    torch.testing.assert_close(w, torch.tensor([[2.0]]))
    w, idx, _ = gate(x, topk=3)
    order = idx[0].argsort()
    assert idx[0, order].tolist() == [2, 6, 7]
    torch.testing.assert_close(w[0, order], torch.tensor([0.60, 0.70, 0.69]) / 1.99 * 2.0)


def test_moe_at_another_topk_matches_naive_loop():
    m = _moe()
    x = torch.randn(9, 128)
    y, routing = m(x, topk=1)
    assert routing.indices.shape == (9, 1) and routing.load.sum() == 9
    ref = MoE(ModelConfig.preset("tiny").replace(n_activated_experts=1))  # the same weights, configured at k = 1
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(y, _naive(ref, x))
