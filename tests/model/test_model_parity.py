"""seekforge's model against transformers' own DeepseekV3/V2 on random checkpoints saved by transformers."""

import pytest
import torch

import seekforge
from hf_reference import CASES, hf_model, save_hf
from seekforge.model.backend import Backend

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:config.json declares")


def _tokens(seed=0, batch=2, seq=37, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_matches_transformers(case, tmp_path):
    ref = save_hf(case, tmp_path)
    ours = seekforge.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = _tokens()
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 37, 96)
    assert expected.std() > 0.1  # the comparison is not between near-constant outputs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bf16_models_keep_fp32_rotary_frequencies(tmp_path):
    """Loaded in bf16 or cast to it, the model's rotary angles are those of fp32 frequencies (transformers keeps
    them so): hand-computed in float64 at positions up to 4,000, within fp32's rounding. Frequencies rounded to
    bf16 (0.1 becomes 0.10009765625) turned the second pair's angle at position 4,000 by 0.39 rad."""
    save_hf("v2_softmax_greedy", tmp_path)  # no YaRN: inv_freq_i = theta^(-2i / r)
    loaded = seekforge.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = seekforge.from_pretrained(tmp_path, dtype=torch.float32).to(torch.bfloat16)
    positions = torch.tensor([[0, 1, 17, 1000, 2500, 4000]])
    r = loaded.cfg.qk_rope_head_dim
    angles = positions.double().unsqueeze(-1) * loaded.cfg.rope_theta ** (-torch.arange(0, r, 2).double() / r)
    for model in (loaded, cast):
        assert model.embed.weight.dtype == torch.bfloat16
        cos, sin = model.rope(positions)
        torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-3, rtol=0)
        torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-3, rtol=0)


def test_bf16_absorbed_attention_is_as_precise_as_explicit():
    """At the 16b shape's attention (c = 512), in bf16 against the same module in fp64 on the same inputs: the
    absorbed path's error is the explicit path's (whose attention kernel keeps the scores in fp32)."""
    from seekforge.model import ModelConfig
    from seekforge.model.mla import MLA
    from seekforge.model.rope import RotaryEmbedding

    cfg = ModelConfig.preset("16b")
    torch.manual_seed(0)
    attn = MLA(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.05)
        attn.kv_norm.weight.fill_(1.0)
    x = torch.randn(1, 96, cfg.dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    cos, sin = RotaryEmbedding(cfg)(torch.arange(96).unsqueeze(0))
    with torch.no_grad():
        want = attn.double()(x.double(), cos.double(), sin.double())
        attn = attn.bfloat16()
        error = {absorbed: ((attn(x, cos, sin, backend=Backend(absorbed)).double() - want).norm(dim=-1)
                            / want.norm(dim=-1)).mean() for absorbed in (False, True)}
    assert error[True] < 1.1 * error[False]


@pytest.mark.parametrize("case", sorted(CASES))
def test_absorbed_path_equals_explicit(case, tmp_path):
    save_hf(case, tmp_path)
    ours = seekforge.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, backend=Backend(absorbed=True)), ours(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["v3_sigmoid_grouped_qlora", "v2_group_limited_yarn"])
def test_save_pretrained_loads_back_in_transformers(case, tmp_path):
    save_hf(case, tmp_path / "hf")
    ours = seekforge.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    tokens = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    # the gate bias (V3) survived the round trip
    if CASES[case][0] == "deepseek_v3":
        torch.testing.assert_close(back.model.layers[1].mlp.gate.e_score_correction_bias,
                                   ours.layers[1].ffn.gate.bias)


def test_mtp_modules_round_trip_and_hf_ignores_them(tmp_path):
    cfg = seekforge.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = seekforge.Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    back = seekforge.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.cfg.n_mtp_modules == 1
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(3, vocab=cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)


def test_mtp_logits_predict_shifted_targets():
    """Depth k at position i sees token i+k and must be scored against token i+k+1."""
    cfg = seekforge.ModelConfig.preset("tiny").replace(n_mtp_modules=2)
    torch.manual_seed(0)
    model = seekforge.Transformer(cfg).eval()
    tokens = _tokens(4, batch=2, seq=12, vocab=cfg.vocab_size)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    with torch.no_grad():
        h = model.hidden(tokens)[0]
        depths = model.mtp_logits(tokens, h)[0]
        assert [d.shape[1] for d in depths] == [11, 10]
        # depth 1 at position i is computed from h_i and the embedding of token i+1 only (causal)
        i = 4
        h1 = model.mtp[0](h[:, : i + 1], model.embed(tokens[:, 1 : i + 2]),
                          *model.rope(torch.arange(i + 1).unsqueeze(0)))[0]
        torch.testing.assert_close(model.head(model.mtp[0].norm(h1))[:, i], depths[0][:, i], atol=1e-5, rtol=0)
        out = model.loss(tokens, labels, mtp_weight=0.5)
        ce = torch.nn.functional.cross_entropy
        want_mtp = (ce(depths[0].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
                    + ce(depths[1].flatten(0, 1), labels[:, 2:].flatten(), ignore_index=-100)) / 2
        torch.testing.assert_close(out.mtp_loss, want_mtp)
        torch.testing.assert_close(out.loss, out.main_loss + 0.5 * want_mtp)
    # changing the token two steps ahead changes depth-1 logits only from that position on
    tokens2 = tokens.clone()
    tokens2[:, 7] = (tokens2[:, 7] + 1) % cfg.vocab_size
    with torch.no_grad():
        d2 = model.mtp_logits(tokens2, model.hidden(tokens2)[0])[0]
    torch.testing.assert_close(d2[0][:, :6], depths[0][:, :6], atol=1e-5, rtol=0)
    assert not torch.allclose(d2[0][:, 6], depths[0][:, 6])


def test_expert_load_counts_every_routed_token():
    cfg = seekforge.ModelConfig.preset("tiny")
    model = seekforge.Transformer(cfg)
    tokens = _tokens(5, batch=3, seq=10, vocab=cfg.vocab_size)
    out = model.loss(tokens, torch.roll(tokens, -1, 1), mtp_weight=0.3)
    # main MoE layers plus the MTP block's MoE, by layer id
    assert list(out.expert_load) == [*range(cfg.n_dense_layers, cfg.n_layers), cfg.n_layers]
    assert int(out.expert_load[cfg.n_dense_layers].sum()) == 3 * 10 * cfg.n_activated_experts
    assert int(out.expert_load[cfg.n_layers].sum()) == 3 * 9 * cfg.n_activated_experts
    out.loss.backward()
    assert model.layers[1].ffn.experts.w1.grad is not None
    assert model.layers[1].ffn.gate.bias.grad is None  # a buffer: no optimizer can move it


@pytest.mark.parametrize("case,k", [("v3_sigmoid_grouped_qlora", 1), ("v2_softmax_greedy", 1),
                                    ("v3_no_groups_plain_q", 3)])
def test_topk_override_matches_transformers_at_that_k(case, k, tmp_path):
    """A forward at another routed top-k (the backend's `topk`, what the engine's adaptive experts pass) is the
    checkpoint's model configured with that k in transformers: same weights (same seed), num_experts_per_tok = k,
    the weights normalised over the k chosen where the config says."""
    save_hf(case, tmp_path)  # num_experts_per_tok = 2
    ref = hf_model(case, num_experts_per_tok=k)
    ours = seekforge.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = _tokens()
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens, backend=Backend(topk=k))
        default = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (default - expected).abs().max() > 1e-2  # the override, not the config's k, made the match
