"""Fixtures of the server tests."""

import pytest
from server_harness import IN_PROCESS_NAME, build_checkpoint, in_process


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(tokenizer, HTTP client, openai client) of the app running in-process over the scripted checkpoint."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from seekforge.engine import EngineConfig

    path = tmp_path_factory.mktemp("server") / "tiny-tools"
    tok, _ = build_checkpoint(path)
    engine = EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_memory=16 << 20)
    with in_process(path, IN_PROCESS_NAME, engine) as http:
        yield tok, http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http, max_retries=0)
