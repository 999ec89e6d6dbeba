"""The chat page in a real headless Chromium, driven by Playwright, against a `seekforge serve` process.

Needs `pip install playwright` and a Chromium: Playwright's own (`python -m playwright install chromium`) or
the system's (`apt-get install chromium`); skipped without them. The checkpoint is server_harness's scripted
one: after the assistant tag it writes "<think>\\n quick fox</think> lazy dog<EOS>", so the reasoning and the
answer have known texts.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from server_harness import ANSWER, KEY, NAME, REASONING, Server, build_checkpoint

sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright` (and a Chromium)")


def _chromium(playwright) -> str | None:
    """The Chromium to drive: Playwright's download if present, else the system's."""
    try:
        own = playwright.chromium.executable_path
    except Exception:  # noqa: BLE001 - Playwright raises its own error type when no browser was installed
        own = None
    if own and os.path.exists(own):
        return own
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "tiny-chain"
    build_checkpoint(path)
    srv = Server(path, "--served-model-name", NAME, "--api-key", KEY, "--dtype", "float32", "--max-model-len", "1024")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        executable = _chromium(p)
        if executable is None:
            pytest.skip("no Chromium: run `python -m playwright install chromium` or `apt-get install chromium`")
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser):
    """The page, opened and given the API key it asks for."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#key-row")).to_be_visible()  # /v1/models answered 401
    sync_api.expect(page.locator("#notice")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")  # a change event: the models are fetched again, with the key
    sync_api.expect(page.locator("#model option")).to_have_text([NAME])
    sync_api.expect(page.locator("#notice")).to_be_hidden()
    yield page
    page.close()


def _say(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_streamed_answer_reasoning_apart_and_multi_turn(page):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "20")
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    _say(page, "hi")
    last = page.locator(".turn.assistant").last
    sync_api.expect(last.locator(".stats")).to_contain_text("stop")
    assert last.locator("details.reasoning .text").text_content() == REASONING
    assert last.locator(":scope > .text").first.text_content() == ANSWER
    details = last.locator("details.reasoning")
    assert details.get_attribute("open") is None, "the reasoning folds away once the answer is done"
    details.locator("summary").click()
    sync_api.expect(last.locator("details.reasoning .text")).to_be_visible()
    assert sent[-1]["stream"] is True and sent[-1]["temperature"] == 0 and sent[-1]["max_tokens"] == 20
    assert sent[-1]["model"] == NAME

    _say(page, "again")
    sync_api.expect(page.locator(".turn.assistant").nth(1).locator(".stats")).to_contain_text("stop")
    # the whole conversation goes back, the earlier answer without its reasoning
    assert sent[-1]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER},
                                    {"role": "user", "content": "again"}]


def test_stop_aborts_the_generation_on_the_server(page, server):
    aborted = server.metric("seekforge_request_finished_total", finish_reason="abort")

    def long_generation(route):
        # the scripted model ends after 8 tokens; ignore_eos lets it run on to max_tokens (a client-side change
        # of the page's own request, so the page's code path is the one under test)
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_generation)
    page.fill("#max-tokens", "900")
    _say(page, "hi")
    answer = page.locator(".turn.assistant").last
    sync_api.expect(answer.locator(":scope > .text").first).not_to_have_text("")  # the answer streams in
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    sync_api.expect(answer.locator(".stats")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    deadline = time.time() + 20  # the engine's gauges are published every few hundred milliseconds
    while not (server.metric("seekforge_request_finished_total", finish_reason="abort") == aborted + 1
               and server.metric("seekforge_requests_running") == 0):
        assert time.time() < deadline, "the server did not abort the generation when the page stopped"
        time.sleep(0.05)
