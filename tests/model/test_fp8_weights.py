"""FP8 inference weights (`seekforge.model.fp8_weights`): DeepSeek's FP8 checkpoints loaded keeping e4m3 and the
block scales, saved in the same layout, 16-bit weights quantised on load, and the memory they take."""

import json

import pytest
import torch
from fp8_checkpoint import (FP8, FP8_KEY, QUANTIZATION_CONFIG, dequantise_by_hand, quantise_by_hand,
                            write_fp8_checkpoint)
from safetensors.torch import load_file, save_file

import seekforge
from seekforge import CheckpointError, ConfigError, ops
from seekforge.model.fp8_weights import (FP8WeightExperts, FP8WeightLinear, _convert_experts, memory_bytes,
                                         to_fp8_weights)
from seekforge.model.hf import from_pretrained, hf_to_ours

CFG = seekforge.ModelConfig.preset("tiny")  # dims 128, 64, 48, 384: whole and partial blocks


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    return path, write_fp8_checkpoint(path, CFG)


def _ours(model, key: str):
    """The tensor (or expert slice) of our model that an HF key loads into, and its scale where FP8."""
    name, expert = hf_to_ours(key, model.cfg)
    state = model.state_dict()
    pick = (lambda t: t) if expert is None else (lambda t: t[expert])
    scale = state.get(name + "_scale_inv")
    return pick(state[name]), None if scale is None else pick(scale)


def test_fp8_checkpoint_keeps_its_e4m3_weights_and_block_scales(fp8_ckpt):
    path, tensors = fp8_ckpt
    model = from_pretrained(path, dtype=torch.bfloat16, fp8_weights=True)
    fp8_keys = [k for k in tensors if FP8_KEY.match(k)]
    kept = 0
    for key in fp8_keys:
        weight, scale = _ours(model, key)
        if "kv_b_proj" in key:  # the absorbed attention reads wkv_b as per-head matrices: dequantised
            assert weight.dtype == torch.bfloat16 and scale is None
            torch.testing.assert_close(weight, dequantise_by_hand(tensors[key], tensors[key + "_scale_inv"])
                                       .to(torch.bfloat16), atol=0, rtol=0)
            continue
        assert weight.dtype == FP8, key
        assert torch.equal(weight.view(torch.uint8), tensors[key].view(torch.uint8)), key
        assert torch.equal(scale, tensors[key + "_scale_inv"]), key
        kept += 1
    assert kept == len(fp8_keys) - CFG.n_layers - CFG.n_mtp_modules
    assert isinstance(model.layers[0].attn.wq_a, FP8WeightLinear)
    assert isinstance(model.layers[-1].ffn.experts, FP8WeightExperts)
    assert model.embed.weight.dtype == model.layers[0].attn_norm.weight.dtype == torch.bfloat16


def test_fp8_weights_compute_as_the_checkpoint_dequantised(fp8_ckpt):
    """On the reference path each FP8 projection is its weight dequantised into the input's dtype then F.linear:
    the logits equal those of the same checkpoint loaded dequantised to bf16, exactly."""
    path, _ = fp8_ckpt
    fp8 = from_pretrained(path, dtype=torch.bfloat16, fp8_weights=True)
    bf16 = from_pretrained(path, dtype=torch.bfloat16)
    tokens = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fp8(tokens), bf16(tokens), atol=0, rtol=0)


def _padded_in_place(model) -> int:
    """Checks that every FP8 linear layer's weight and scales are views of its GEMM operands (`gemm_operands`, so the
    loader copied into them), whose padding holds zeros (the scales': ones); returns how many have padding."""
    padded = 0
    for name, module in model.named_modules():
        if not isinstance(module, FP8WeightLinear):
            continue
        w, s = module.gemm_operands
        (n, k), (sn, sk) = module.weight.shape, module.weight_scale_inv.shape
        assert module.weight.data_ptr() == w.data_ptr(), name
        assert module.weight_scale_inv.data_ptr() == s.data_ptr(), name
        assert not w.view(torch.uint8)[n:].any() and not w.view(torch.uint8)[:, k:].any(), name
        assert (s[sn:] == 1).all() and (s[:, sk:] == 1).all(), name
        padded += w.shape != module.weight.shape
    return padded


def test_save_writes_deepseeks_layout_and_round_trips(fp8_ckpt, tmp_path):
    """The checkpoint's tensors in their published shapes, though the model keeps its FP8 weights padded."""
    path, tensors = fp8_ckpt
    model = from_pretrained(path, dtype=torch.bfloat16, fp8_weights=True)
    assert _padded_in_place(model) > 0
    model.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    saved = load_file(tmp_path / "again" / "model.safetensors")
    for key in (k for k in tensors if FP8_KEY.match(k) and "kv_b_proj" not in k):
        assert saved[key].dtype == FP8 and torch.equal(saved[key].view(torch.uint8), tensors[key].view(torch.uint8))
        assert torch.equal(saved[key + "_scale_inv"], tensors[key + "_scale_inv"])
    back = from_pretrained(tmp_path / "again", dtype=torch.bfloat16, fp8_weights=True)
    assert _padded_in_place(back) > 0
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


def test_16bit_checkpoint_is_quantised_blockwise_on_load(tmp_path):
    torch.manual_seed(1)
    model = seekforge.Transformer(CFG).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    back = from_pretrained(tmp_path / "bf16", fp8_weights=True)
    for key, w in load_file(tmp_path / "bf16" / "model.safetensors").items():
        if not FP8_KEY.match(key) or "kv_b_proj" in key:
            continue
        q, scale = _ours(back, key)
        want_q, want_scale = quantise_by_hand(w)
        assert q.dtype == FP8 and torch.equal(scale, want_scale), key
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), key


def test_a_live_model_converts_in_place_to_the_same_weights():
    torch.manual_seed(2)
    model = seekforge.Transformer(CFG).to(torch.bfloat16)
    w = model.layers[1].ffn.experts.w2[3].clone()
    to_fp8_weights(model)
    experts = model.layers[1].ffn.experts
    q, scale = quantise_by_hand(w)
    assert experts.w2.dtype == FP8 and experts.w2.shape == (CFG.n_routed_experts, CFG.dim, CFG.moe_inter_dim)
    assert torch.equal(experts.w2[3].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(experts.w2_scale_inv[3], scale)
    assert not any(p.requires_grad for p in experts.parameters())


def test_fp8_layers_stay_views_of_their_padded_operands_where_the_model_moves():
    """Moving the model (`to`, `to_empty`) makes its tensors anew: the FP8 layers pad again, and a state dict loads
    into the views, the GEMM's operands."""
    torch.manual_seed(3)
    model = to_fp8_weights(seekforge.Transformer(CFG).to(torch.bfloat16))
    state = {name: t.clone() for name, t in model.state_dict().items()}
    assert _padded_in_place(model.to("cpu")) > 0
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    assert _padded_in_place(model) > 0
    for name, t in model.state_dict().items():
        assert t.shape == state[name].shape and torch.equal(t.view(torch.uint8), state[name].view(torch.uint8)), name
    # assign=True puts the state's own tensors in place of the views: the layers pad them anew, and the blockwise
    # GEMM (the Triton backend: under its interpreter on a CPU) reads what was loaded
    pytest.importorskip("triton")
    model.to_empty(device="cpu")
    model.load_state_dict({name: t.clone() for name, t in state.items()}, assign=True)
    assert _padded_in_place(model) > 0
    tokens = torch.randint(0, CFG.vocab_size, (1, 9))
    with ops.backend("triton"), torch.no_grad():
        got = model(tokens)
    model.load_state_dict(state)
    with ops.backend("triton"), torch.no_grad():
        assert torch.equal(got, model(tokens))


@pytest.mark.parametrize("preset", ["16b", "671b"])
def test_memory_per_parameter_halves(preset):
    """Bytes of parameters and buffers, counted on the meta device: the FP8 model's over the bf16 model's. Each
    converted parameter takes 1 byte plus its block's 4-byte scale over 16384 of them, the rest stays 2 bytes."""
    cfg = seekforge.ModelConfig.preset(preset)
    with torch.device("meta"):
        model = seekforge.Transformer(cfg).to(torch.bfloat16)
    bf16 = memory_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    to_fp8_weights(model)
    fp8 = memory_bytes(model)
    assert sum(p.numel() for p in model.parameters()) == params  # the scales are buffers, not parameters
    kept = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert fp8 < bf16 * (0.5 + kept / params / 2 + 1e-3)  # 1 byte where FP8 (+ scales), 2 where kept
    assert fp8 / bf16 < {"16b": 0.53, "671b": 0.51}[preset]


def test_bad_combinations_name_the_fix(fp8_ckpt, tmp_path):
    path, tensors = fp8_ckpt
    with pytest.raises(ConfigError, match="fp8_weights is true or false"):
        from_pretrained(path, fp8_weights="yes")
    other = tmp_path / "blocks64"
    other.mkdir()
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="128x128 blocks.*without fp8_weights"):
        from_pretrained(other, fp8_weights=True)
    from seekforge.fp8.convert import convert_to_fp8

    with pytest.raises(ConfigError, match="FP8 inference weights"):
        convert_to_fp8(from_pretrained(path, fp8_weights=True))


def test_mis_shaped_block_scales_are_a_checkpoint_error(fp8_ckpt, tmp_path):
    path, tensors = fp8_ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    key = "model.layers.0.mlp.gate_proj.weight_scale_inv"
    save_file({**tensors, key: tensors[key][:1]}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="gate_proj.weight_scale_inv has shape"):
        from_pretrained(bad, fp8_weights=True)


@pytest.mark.parametrize("tokens", [1, 3, 40], ids=lambda n: f"{n}tokens")  # 2, 6 rows (< 8 experts), 80 rows
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_fp8_experts_compute_as_their_weights_dequantised_by_hand(tokens, autocast):
    """Decode's few rows (each row's expert gathered and dequantised alone), prefill's many (the layer's experts
    dequantised) and autocast (dequantised before the cast): each as the same experts holding the weights
    dequantised by hand."""
    from seekforge.model.moe import Experts

    torch.manual_seed(3)
    experts = Experts(8, 144, 200)  # partial blocks on both sides
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, 0.0, 0.05)
    x = torch.randn(tokens, 144)
    weights, indices = torch.rand(tokens, 2), torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
    reference = Experts(8, 144, 200)
    with torch.no_grad():
        _convert_experts(experts)  # the converter's step for one module
        for name in ("w1", "w2", "w3"):
            q, s = getattr(experts, name), getattr(experts, name + "_scale_inv")
            getattr(reference, name).copy_(torch.stack([dequantise_by_hand(q[e], s[e]) for e in range(8)]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, load = experts(x, weights, indices)
            want, want_load = reference(x, weights, indices)
    assert got.dtype == want.dtype and torch.equal(load, want_load)
    torch.testing.assert_close(got, want, atol=1e-2 if autocast else 1e-5, rtol=1e-2 if autocast else 1e-5)
