"""The server renders the checkpoint's own chat template: with DeepSeek-R1's style of template, whose generation
prompt opens <think>, the answer starts inside the think block and still comes back split into
reasoning_content and content; a template that refuses a conversation (raise_exception) is a 400.

The app runs in-process (starlette's TestClient, which the openai client accepts as its HTTP client) over
test_server's scripted checkpoint: after "<think>\\n" the model writes " quick fox</think> lazy dog<EOS>".
"""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
from chat_templates import R1_STYLE  # noqa: E402
from server_harness import ANSWER, build_checkpoint, collect_chat, in_process  # noqa: E402

from seekforge.engine import EngineConfig  # noqa: E402

NAME = "r1-style"
# R1's template, refusing a conversation that opens with an answer (as templates refuse what they cannot render)
TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}"
            "{{ raise_exception('the conversation must open with a system or user message') }}{% endif %}" + R1_STYLE)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "r1-style"
    build_checkpoint(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}), encoding="utf-8")
    engine = EngineConfig(dtype="float32", max_model_len=256, max_num_seqs=4, kv_cache_memory=8 << 20)
    with in_process(path, NAME, engine) as http:
        yield path, http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http,
                                        max_retries=0)


def test_reasoning_content_when_the_template_opened_think(served):
    path, _, client = served
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>old</think>hello"}, {"role": "user", "content": "again"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == (" quick fox", ANSWER, "stop")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert r.usage.prompt_tokens == len(hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))
    streamed = collect_chat(client.chat.completions.create(model=NAME, messages=msgs, temperature=0, stream=True))[0]
    assert (streamed["reasoning"], streamed["content"], streamed["finish"]) == (" quick fox", ANSWER, "stop")


def test_a_template_refusing_the_conversation_is_a_400(served):
    _, http, client = served
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "must open with a system or user message" in err["message"] and err["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="must open with a system or user message"):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "x"}], stream=True)
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                          temperature=0).choices[0].message.content == ANSWER


def test_the_engine_settings_reach_the_llm(served):
    _, http, _ = served
    llm = http.app.state.engine.llm
    assert llm.max_model_len == 256 and llm.scheduler.max_num_seqs == 4
    assert llm.model.embed.weight.dtype == torch.float32
    per_block = llm.cache_bytes_per_token * llm.block_manager.block_size
    assert llm.block_manager.num_blocks == min((8 << 20) // per_block - 1, 4 * -(-256 // llm.block_manager.block_size))


def test_serve_flags_fill_the_engine_config(served, monkeypatch):
    import seekforge.server
    from seekforge.cli import main

    path = served[0]
    configs = []
    monkeypatch.setattr(seekforge.server, "serve", lambda config: configs.append(config) or 0)
    assert main(["serve", str(path), "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "3",
                 "--max-num-batched-tokens", "64", "--max-waiting", "7", "--kv-cache-gib", "0.5", "--cuda-graphs",
                 "--compile", "--async-scheduling", "off"]) == 0
    assert configs[0].engine == EngineConfig(
        dtype="float32", max_model_len=128, max_num_seqs=3, max_num_batched_tokens=64, max_waiting=7,
        kv_cache_memory=2**29, cuda_graphs=True, compile=True, async_scheduling=False)
    assert main(["serve", str(path)]) == 0 and configs[1].engine.max_waiting == 1024  # the server's queue bound
