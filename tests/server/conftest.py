"""Fixtures of the server tests."""

import time

import pytest
from server_harness import IN_PROCESS_NAME, build_checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(tokenizer, HTTP client, openai client) of the app running in-process over the scripted checkpoint."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from seekforge.engine import EngineConfig
    from seekforge.server import ServerConfig
    from seekforge.server.app import create_app

    path = tmp_path_factory.mktemp("server") / "tiny-tools"
    tok, _ = build_checkpoint(path)
    engine = EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_memory=16 << 20)
    app = create_app(ServerConfig(str(path), served_model_names=[IN_PROCESS_NAME], engine=engine))
    with TestClient(app) as http:
        deadline = time.time() + 120
        while http.get("/health").status_code != 200:
            assert time.time() < deadline, "the engine did not get ready"
            time.sleep(0.05)
        yield tok, http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http, max_retries=0)
