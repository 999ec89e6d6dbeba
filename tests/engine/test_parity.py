"""The bf16 precision check of bench/engine.py (`seekforge.engine.parity`): the error measure against hand-computed
values, the engine's teacher-forced logits against transformers' in fp32, and the check on a tiny model in bf16,
passed by the engine and failed by an engine with a slightly wrong weight."""

from __future__ import annotations

import math

import pytest
import torch

from hf_reference import save_hf
from seekforge import LLM
from seekforge.engine.parity import FACTOR, forced_logits, logit_error, logit_parity
from seekforge.errors import ConfigError

pytestmark = [pytest.mark.filterwarnings("ignore:config.json declares"), pytest.mark.usefixtures("one_thread")]


def test_error_is_of_the_centred_logits_and_the_check_weighs_it_against_the_peers():
    ref = torch.tensor([[3.0, -1.0, -1.0, -1.0]])  # centred already: |ref| = sqrt(12)
    engine = ref + torch.tensor([[0.0, 0.0, 1.0, -1.0]]) + 5.0  # off by sqrt(2), and shifted (no change)
    peer = ref + torch.tensor([[0.5, -0.5, 0.0, 0.0]])  # off by sqrt(0.5)
    assert logit_error(ref, engine).item() == pytest.approx(math.sqrt(2 / 12))
    assert logit_error(ref, ref + 7.0).item() == pytest.approx(0.0, abs=1e-7)
    failed = logit_parity(ref, engine, peer, factor=1.5)
    assert failed["ratio"] == pytest.approx(2.0) and not failed["passed"]
    assert failed["engine_argmax_agreement"] == 1.0 and failed["rows"] == 1
    assert logit_parity(ref, engine, peer, factor=2.5)["passed"]
    nan = engine.clone()
    nan[0, 1] = float("nan")
    assert not logit_parity(ref, nan, peer, factor=100.0)["passed"]
    alone = logit_parity(ref, engine, None, factor=1.5, floor=0.5)  # no peer: the floor alone
    assert alone["peer_error"] == 0.0 and alone["passed"] and not logit_parity(ref, engine, None, 1.5, 0.3)["passed"]
    with pytest.raises(ConfigError, match="one shape"):
        logit_parity(ref, engine[:, :3], peer, 1.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A transformers checkpoint (fp32 reference and bf16 peer), prompts, and the bf16 peer's greedy tokens."""
    import transformers

    path = tmp_path_factory.mktemp("hf")
    hf32 = save_hf("v2_softmax_greedy", path)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 96, (5, 12), generator=g)
    with torch.no_grad():
        tokens = hf16.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, min_new_tokens=8,
                               do_sample=False, eos_token_id=10**6)[:, 12:]
    return path, hf32, hf16, prompts, tokens


def hf_forced(hf, prompts, tokens):
    with torch.no_grad():
        return hf(torch.cat([prompts, tokens[:, :-1]], dim=1)).logits[:, -tokens.shape[1]:].float()


def test_forced_logits_are_transformers_teacher_forced_in_fp32(tiny):
    path, hf32, _, prompts, tokens = tiny
    llm = LLM(path, dtype=torch.float32, max_model_len=64)
    got = forced_logits(llm, prompts.tolist(), tokens.tolist(), groups=[1, 3, 1])
    assert got.shape == (5, 8, 96)
    torch.testing.assert_close(got, hf_forced(hf32, prompts, tokens), atol=1e-4, rtol=1e-4)
    assert llm.generate(prompts[0].tolist())[0].num_cached_tokens == 0  # the overwritten blocks are no prefix hit
    with pytest.raises(ConfigError, match="group sizes"):
        forced_logits(llm, prompts.tolist(), tokens.tolist(), groups=[2, 2])


def test_the_bf16_engine_passes_the_check_and_a_slightly_wrong_one_fails_it(tiny):
    path, hf32, hf16, prompts, tokens = tiny
    reference, peer = hf_forced(hf32, prompts, tokens), hf_forced(hf16, prompts, tokens)
    llm = LLM(path, dtype=torch.bfloat16, max_model_len=64)
    gate = logit_parity(reference, forced_logits(llm, prompts.tolist(), tokens.tolist(), [1, 4]), peer, FACTOR)
    assert gate["passed"] and 0.003 < gate["peer_error"] < 0.05
    wo = llm.model.layers[1].attn.wo.weight
    with torch.no_grad():  # one projection of one layer 10% too large
        wo.mul_(1.1)
    broken = logit_parity(reference, forced_logits(llm, prompts.tolist(), tokens.tolist(), [1, 4]), peer, FACTOR)
    assert not broken["passed"] and broken["ratio"] > FACTOR
