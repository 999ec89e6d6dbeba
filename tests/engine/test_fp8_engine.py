"""The engine over FP8 weights on the CPU (`EngineConfig.weights_dtype="fp8"`): loaded from a DeepSeek FP8 checkpoint
written by hand, it generates, and its teacher-forced logits are compared with the engine's over the same checkpoint
dequantised to bf16 (what loading without fp8_weights gives) and over the bf16 model before quantisation."""

import pytest
import torch
from fp8_checkpoint import FP8, write_fp8_checkpoint

import seekforge
from seekforge import LLM, ConfigError, SamplingParams
from seekforge.engine.config import EngineConfig
from seekforge.engine.parity import forced_logits, logit_error

CFG = seekforge.ModelConfig.preset("tiny")
SETTINGS = {"num_blocks": 64, "max_num_seqs": 4, "kernels": "torch"}


def _compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Per row relative error of the logits (`logit_error`: each row's mean taken out) and top-1 agreement."""
    error = logit_error(reference, logits)
    return {"max_rel": error.max().item(), "mean_rel": error.mean().item(),
            "top1": (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()}


def test_fp8_engine_generates_with_logits_close_to_bf16(tmp_path):
    path = tmp_path / "ckpt"
    write_fp8_checkpoint(path, CFG, seed=0)
    torch.manual_seed(0)  # the bf16 model the checkpoint was quantised from (write_fp8_checkpoint's seed)
    original = seekforge.Transformer(CFG).to(torch.bfloat16).eval()
    prompts = torch.randint(2, CFG.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0)).tolist()

    fp8 = LLM(path, weights_dtype="fp8", **SETTINGS)
    assert fp8.model.layers[0].attn.wq_a.weight.dtype == FP8 and fp8.model.layers[-1].ffn.experts.w1.dtype == FP8
    outputs = fp8.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tokens = [o.token_ids for o in outputs]
    assert all(len(t) == 8 for t in tokens)
    groups = [1, 1, 2]  # decode steps of batch 1 and 2
    got = forced_logits(fp8, prompts, tokens, groups)

    dequantised = _compare(forced_logits(LLM(path, **SETTINGS), prompts, tokens, groups), got)
    # the reference path dequantises each weight into bf16 as the loader does: the same logits
    assert dequantised["max_rel"] <= 1e-3 and dequantised["top1"] == 1.0, dequantised
    quantised = _compare(forced_logits(LLM(original, **SETTINGS), prompts, tokens, groups), got)
    # e4m3's rounding (3 mantissa bits a weight) of a random tiny model, whose logits are close together: measured
    # max 0.37, mean 0.058, top-1 0.84
    assert quantised["mean_rel"] <= 0.1 and quantised["max_rel"] <= 0.6 and quantised["top1"] >= 0.75, quantised


def test_weights_dtype_checks(tmp_path):
    with pytest.raises(ConfigError, match="weights_dtype is None .* or \"fp8\""):
        EngineConfig(weights_dtype="int8")
    model = seekforge.Transformer(CFG)
    with pytest.raises(ConfigError, match="to_fp8_weights"):
        LLM(model, weights_dtype="fp8", **SETTINGS)
    from seekforge.model.fp8_weights import to_fp8_weights

    LLM(to_fp8_weights(model), weights_dtype="fp8", **SETTINGS)  # already FP8: used as it is
