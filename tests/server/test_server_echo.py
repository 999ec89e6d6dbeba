"""Prompt log-probabilities: /v1/completions with echo and logprobs returns the prompt tokens' logprobs as
vLLM does (the first is null), checked against a plain full forward of the same weights; and the real
lm-evaluation-harness (`local-completions` pointed at `seekforge serve`) scores a multiple-choice task and a
generate-until task defined in local files as its own Hugging Face backend scores them on the same checkpoint."""

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


GEN_ROWS = [{"question": "The quick brown", "target": " fox"},
            {"question": "What is 12 + 30? The answer is", "target": " 42"},
            {"question": "Hello world, this", "target": " is"}]


@pytest.mark.slow
def test_lm_eval_scores_through_the_server_equal_its_hf_backend(ckpt, tmp_path):
    """lm-eval through `seekforge serve` (local-completions) and through its Hugging Face backend (transformers)
    on the same checkpoint, float32 both: every choice's loglikelihood of a multiple-choice task agrees within
    1e-3, and a generate-until task's greedy completions (stop strings, max_gen_toks) are equal, text for text,
    so its exact-match scores are too."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    path = ckpt[0]
    for name, rows in (("mc", ROWS), ("gen", GEN_ROWS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        f"task: seekforge_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n")
    (tmp_path / "gen.yaml").write_text(
        f"task: seekforge_local_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/gen.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['ver', '\\n']\n  do_sample: false\n  temperature: 0.0\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    # greedy, at most 8 tokens, cut at a stop string: this seed's random model writes 'ver' in the second
    # completion (the server's `stop` cuts it) and runs the other two to max_gen_toks
    tasks = ["seekforge_local_mc", "seekforge_local_gen"]

    def scores(model: str, model_args: str) -> tuple[list[float], list[str], float]:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
        mc, gen = (sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in tasks)
        return ([r[0][0] for s in mc for r in s["resps"]], [s["filtered_resps"][0] for s in gen],
                out["results"]["seekforge_local_gen"]["exact_match,none"])

    # add_bos_token on both: lm-eval's API models leave BOS out unless told, its HF backend follows the tokenizer
    hf = scores("hf", f"pretrained={path},dtype=float32,device=cpu,batch_size=1,add_bos_token=True")
    srv = Server(path, "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", "256")
    try:
        served = scores("local-completions", f"base_url={srv.url}/v1/completions,model={NAME},tokenizer={path},"
                                             "tokenized_requests=True,num_concurrent=1,max_retries=1,add_bos_token=True")
    finally:
        srv.stop()
    assert len(served[0]) == sum(len(r["choices"]) for r in ROWS)
    assert served[0] == pytest.approx(hf[0], abs=1e-3)
    assert len(served[1]) == len(GEN_ROWS) and any(served[1])  # something was generated
    assert served[1] == hf[1] and served[2] == hf[2]  # exact: the same text, character for character
