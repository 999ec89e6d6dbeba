"""Prompt log-probabilities: /v1/completions with echo and logprobs returns the prompt tokens' logprobs as
vLLM does (the first is null), checked against a plain full forward of the same weights; and the real
lm-evaluation-harness (`local-completions` pointed at `seekforge serve`) scores a multiple-choice task
defined in a local file as its own Hugging Face backend scores it on the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from server_harness import TEXTS, Server, in_process  # noqa: E402

import seekforge  # noqa: E402
from seekforge.engine import EngineConfig  # noqa: E402
from seekforge.tokenizer import Tokenizer  # noqa: E402

NAME = "tiny-echo"
ROWS = [{"question": "The quick brown", "choices": [" fox", " dog", " sun"], "answer": 0},
        {"question": "A lazy dog sleeps in the", "choices": [" sun", " fox"], "answer": 0},
        {"question": "What is 12 + 30? The answer is", "choices": [" 42", " 12", " 30"], "answer": 0},
        {"question": "Hello world, this is a small", "choices": [" test", " dog"], "answer": 0}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny DeepSeek-V3 written by transformers (hf_reference), with a small trained tokenizer."""
    pytest.importorskip("transformers")
    from hf_reference import save_hf

    path = tmp_path_factory.mktemp("echo") / "tiny"
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    save_hf("v3_sigmoid_grouped_qlora", path, vocab_size=tok.vocab_size)
    tok.save_pretrained(path)
    return path, tok, seekforge.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def http(ckpt):
    engine = EngineConfig(dtype="float32", max_model_len=256, max_num_seqs=4, kv_cache_memory=8 << 20,
                          max_num_batched_tokens=8)  # prompts prefill in several chunks
    with in_process(ckpt[0], NAME, engine) as client:
        yield client


def test_echo_returns_prompt_logprobs(ckpt, http):
    _, tok, model = ckpt
    prompt = "What is 12 + 30? The answer is 42."
    ids = tok.encode_prompt(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)
    for max_tokens in (0, 3):
        for _ in range(2):  # the second time the prompt is in the prefix cache: still scored in full
            r = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "echo": True, "logprobs": 2,
                                                   "max_tokens": max_tokens, "temperature": 0,
                                                   "return_tokens_as_token_ids": True})  # texts may collide
            assert r.status_code == 200, r.text
            choice, usage = r.json()["choices"][0], r.json()["usage"]
            lp = choice["logprobs"]
            assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
            assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
            for p in range(1, len(ids)):
                top = ref[p - 1].topk(2)
                got = {int(t.split(":")[1]): v for t, v in lp["top_logprobs"][p].items()}
                assert list(got) == top.indices.tolist() and list(got.values()) == pytest.approx(
                    top.values.tolist(), abs=1e-4)
            assert lp["tokens"][:len(ids)] == [f"token_id:{i}" for i in ids]
            assert usage["completion_tokens"] == max_tokens and usage["prompt_tokens"] == len(ids)
    # token-id prompts, several at once, n > 1
    r = http.post("/v1/completions", json={"model": NAME, "prompt": [ids, ids[:5]], "echo": True, "logprobs": 0,
                                           "max_tokens": 0, "n": 2}).json()
    assert [len(c["logprobs"]["tokens"]) for c in r["choices"]] == [len(ids), len(ids), 5, 5]
    assert r["choices"][3]["logprobs"]["token_logprobs"][1:] == pytest.approx(want[:4], abs=1e-4)


def test_echo_errors(http):
    for body, needle in (({"echo": True, "stream": True}, "echo"), ({"max_tokens": 0, "stream": True}, "max_tokens")):
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", **body})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_lm_eval_scores_through_the_server_equal_its_hf_backend(ckpt, tmp_path):
    """lm-eval's loglikelihoods of every choice, through `seekforge serve` (local-completions) and through its
    Hugging Face backend (transformers) on the same checkpoint, agree within 1e-3 (float32 both)."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    path = ckpt[0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "task.yaml").write_text(
        f"task: seekforge_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n")

    def scores(model: str, model_args: str) -> list[float]:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["seekforge_local_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
        samples = sorted(out["samples"]["seekforge_local_mc"], key=lambda s: s["doc_id"])
        return [r[0][0] for s in samples for r in s["resps"]]

    # add_bos_token on both: lm-eval's API models leave BOS out unless told, its HF backend follows the tokenizer
    hf = scores("hf", f"pretrained={path},dtype=float32,device=cpu,batch_size=1,add_bos_token=True")
    srv = Server(path, "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", "256")
    try:
        served = scores("local-completions", f"base_url={srv.url}/v1/completions,model={NAME},tokenizer={path},"
                                             "tokenized_requests=True,num_concurrent=1,max_retries=1,add_bos_token=True")
    finally:
        srv.stop()
    assert len(served) == sum(len(r["choices"]) for r in ROWS)
    assert served == pytest.approx(hf, abs=1e-3)
