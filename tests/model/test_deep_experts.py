"""Heterogeneous expert depth (ModelConfig.n_deep_experts): the mixed-depth MoE against a naive per-token loop,
its config round trip and errors, the default left as it is, and a training step reaching deep experts."""

import copy

import pytest
import torch
import torch.nn.functional as F

from seekforge import ModelConfig
from seekforge.errors import ConfigError
from seekforge.model import Transformer
from seekforge.model.hf import from_pretrained
from seekforge.model.moe import Experts, MoE, looped_linear

# tiny: 8 routed experts in 2 groups of 4; with 2 deep experts, the last one of each group
DEEP = {3, 7}


def _moe(seed=0, **changes):
    cfg = ModelConfig.preset("tiny").replace(n_deep_experts=2, **changes)
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return m


def _swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _naive(m: MoE, x):
    """Token by token, expert by expert: a deep expert is h + b(h), h = a(x), a and b its halves of the inter units;
    the others are one SwiGLU over all of them."""
    w, idx, _ = m.gate(x)
    out = torch.zeros_like(x)
    e = m.experts
    half = e.w1.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            k = int(idx[t, j])
            if k in DEEP:
                h = _swiglu(x[t], e.w1[k, :half], e.w2[k, :, :half], e.w3[k, :half])
                y = h + _swiglu(h, e.w1[k, half:], e.w2[k, :, half:], e.w3[k, half:])
            else:
                y = _swiglu(x[t], e.w1[k], e.w2[k], e.w3[k])
            out[t] += w[t, j] * y
    return out + m.shared_experts(x)


def test_deep_experts_are_the_last_of_each_group():
    assert set(torch.nonzero(_moe().experts.is_deep(torch.arange(8))).flatten().tolist()) == DEEP
    one_group = Experts(6, 4, 8, n_deep=3, n_groups=1)
    assert one_group.is_deep(torch.arange(6)).tolist() == [False] * 3 + [True] * 3


def test_mixed_depth_matches_naive_loop():
    m = _moe()
    x = torch.randn(29, 128)
    y, routing = m(x)
    assert DEEP & set(routing.indices.flatten().tolist()), "the routing must reach a deep expert"
    torch.testing.assert_close(y, _naive(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_depth_in_bf16_matches_naive_loop(device):
    """bf16 takes torch._grouped_mm where it runs (the GPU's path), over the experts' half-width weight views."""
    m = _moe(4).bfloat16()
    x = torch.randn(37, 128).bfloat16()
    want = _naive(copy.deepcopy(m).float(), x.float())  # the same bf16 values in fp32: the same routing
    got = m.to(device)(x.to(device))[0].float().cpu()
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)


def test_mixed_depth_fallback_matmul_matches_naive_loop(monkeypatch):
    m = _moe(1)
    x = torch.randn(2, 9, 128)
    monkeypatch.setattr(m.experts, "matmul", lambda x, weights, offsets, expert_of_row: tuple(
        looped_linear(x, w, expert_of_row) for w in weights))
    torch.testing.assert_close(m(x)[0], _naive(m, x.view(-1, 128)).view(2, 9, 128), atol=1e-5, rtol=1e-5)


def test_mixed_depth_gradients_match_naive_loop():
    grads = []
    for forward in (lambda m, x: m(x)[0], _naive):
        m = _moe(3).double()
        x = torch.randn(19, 128, dtype=torch.float64, requires_grad=True)
        (forward(m, x) * torch.linspace(-1, 1, 128, dtype=torch.float64)).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in (m.experts.w1, m.experts.w2, m.experts.w3, m.gate.weight)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_default_is_off_and_takes_the_one_layer_path(monkeypatch):
    cfg = ModelConfig.preset("tiny")
    assert cfg.n_deep_experts == 0 and "n_deep_experts" not in cfg.to_hf_dict()
    torch.manual_seed(0)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)

    def refuse(*args):
        raise AssertionError("the default model must not run the mixed-depth passes")

    monkeypatch.setattr(m.experts, "_mixed_depth", refuse)
    m(torch.randn(5, 128))


def test_checkpoint_layout_is_a_plain_moe():
    """Deep experts hold the same tensors as one-layer ones: the state dict's names and shapes are unchanged."""
    shapes = [{k: v.shape for k, v in Transformer(ModelConfig.preset("tiny").replace(n_deep_experts=n)).state_dict()
               .items()} for n in (0, 4)]
    assert shapes[0] == shapes[1]


def test_config_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(n_deep_experts=4)
    cfg.save(tmp_path / "config.json")
    loaded = ModelConfig.load(tmp_path)
    assert loaded.n_deep_experts == 4 and loaded == cfg
    assert ModelConfig.from_hf_dict(ModelConfig.preset("tiny").to_hf_dict()).n_deep_experts == 0
    softmax = ModelConfig.preset("16b").replace(n_deep_experts=2)
    assert ModelConfig.from_hf_dict(softmax.to_hf_dict()) == softmax


def test_transformers_refuses_a_deep_expert_config(tmp_path):
    """transformers' DeepSeek classes would read deep experts' tensors as one-layer experts: the config's model
    type is one it does not know, so it refuses instead."""
    transformers = pytest.importorskip("transformers")
    ModelConfig.preset("tiny").replace(n_deep_experts=2).save(tmp_path / "config.json")
    with pytest.raises((ValueError, KeyError), match="seekforge_deep_experts"):
        transformers.AutoConfig.from_pretrained(tmp_path)


def test_deep_model_type_without_deep_experts_is_refused():
    data = ModelConfig.preset("tiny").replace(n_deep_experts=2).to_hf_dict()
    del data["n_deep_experts"]
    with pytest.raises(ConfigError, match="needs n_deep_experts > 0"):
        ModelConfig.from_hf_dict(data)


def test_save_and_load_keep_the_deep_experts(tmp_path):
    cfg = ModelConfig.preset("tiny").replace(n_deep_experts=2, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt", dtype="float32")
    assert loaded.cfg.n_deep_experts == 2
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = model.eval()(tokens)
        torch.testing.assert_close(loaded(tokens), want, atol=0, rtol=0)
        # and the option matters: the same tensors read as a plain MoE give other logits
        plain = from_pretrained(tmp_path / "ckpt", dtype="float32", changes={"n_deep_experts": 0})
        assert not torch.allclose(plain(tokens), want, atol=1e-4)


@pytest.mark.parametrize("changes,match", [
    (dict(n_deep_experts=9), "n_deep_experts must be an integer in"),
    (dict(n_deep_experts=-1), "n_deep_experts must be an integer in"),
    (dict(n_deep_experts=True), "n_deep_experts must be an integer in"),
    (dict(n_deep_experts=3), "divide evenly over the 2 expert groups"),
    (dict(n_deep_experts=2, moe_inter_dim=63), "moe_inter_dim must be even"),
])
def test_bad_deep_expert_configs_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset("tiny").replace(**changes)


def test_a_training_step_reaches_the_deep_experts_second_layer():
    cfg = ModelConfig.preset("tiny").replace(n_deep_experts=2, init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33))

    def loss():
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    before = loss()
    before.backward()
    half = cfg.moe_inter_dim // 2
    deep = sorted(DEEP)
    for layer, moe in model.moe_layers().items():
        if layer >= cfg.n_layers:
            continue  # the MTP module's block: not in the main forward
        e = moe.experts
        for grad in (e.w1.grad[deep, half:], e.w3.grad[deep, half:], e.w2.grad[deep][:, :, half:]):
            assert grad.abs().sum() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    with torch.no_grad():
        assert loss() < before
