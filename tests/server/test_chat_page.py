"""The chat page at /: served without a key, shipped in the package, and calling only what the server has.

The page's behaviour in a browser is tested in test_chat_page_browser.py (skipped without Chromium)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

from seekforge.server import ServerConfig  # noqa: E402
from seekforge.server.app import create_app  # noqa: E402
from seekforge.server.protocol import ChatCompletionRequest  # noqa: E402


@pytest.fixture(scope="module")
def app():
    # the lifespan never runs (no `with`): the engine never starts and no checkpoint is read
    return create_app(ServerConfig("no-checkpoint-needed", api_key="sk-page"))


def test_page_is_served_without_a_key_and_the_api_stays_locked(app):
    http = TestClient(app)
    r = http.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>seekforge chat</title>" in r.text
    assert http.get("/v1/models").status_code == 401, "the page must not open the API"
    assert http.get("/v1/models", headers={"Authorization": "Bearer sk-page"}).status_code == 503  # not loaded
    assert "/" not in app.openapi()["paths"], "the page is no API operation"


def test_page_calls_only_endpoints_the_server_has(app):
    page = TestClient(app).get("/").text
    routes = {(method, route.path) for route in app.routes for method in getattr(route, "methods", ())}
    calls = re.findall(r"""fetch\(\s*["']([^"']+)["']\s*(?:,\s*\{\s*(?:method:\s*["'](\w+)["'])?)?""", page)
    assert {path for path, _ in calls} == {"/v1/models", "/v1/chat/completions"}
    for path, method in calls:
        assert (method or "GET", path) in routes, (method, path)
    # every path the script names is one of those, and nothing is loaded from another host (no CDN)
    assert set(re.findall(r"""["'](/[\w/.-]*)["']""", page)) <= {path for path, _ in calls}
    assert not re.search(r"(src|href)=|https?://|@import|//cdn", page)


def test_page_sends_only_fields_the_chat_endpoint_knows():
    """The request model ignores unknown fields, so a misspelt one would be dropped without a word."""
    page = TestClient(create_app(ServerConfig("x"))).get("/").text
    body = re.search(r"const body = \{(.*?)\n  \};", page, re.S)
    assert body, "the page builds its request in `const body = {...}`"
    fields = set(re.findall(r"^\s*(\w+):", body.group(1), re.M))
    assert {"model", "messages", "stream", "temperature", "max_tokens"} <= fields
    assert fields <= set(ChatCompletionRequest.model_fields), fields - set(ChatCompletionRequest.model_fields)
