"""Serving under load: many concurrent streaming clients against `seekforge serve`, and the same checkpoint
behind `transformers serve --continuous-batching`, one after the other in one run, on loopback.

    python bench/serve_load.py                                    # CPU: tiny preset, 64 clients (a smoke run)
    python bench/serve_load.py --device cuda --dtype bfloat16 --preset small --vocab 8192 --requests 256 \\
        --prompt-tokens 256 --max-tokens 128 --cuda-graphs --json docs/benchmarks/serve-small-h200.json

Unless --model names a checkpoint, a random-weight model of --preset is built with a tokenizer trained on
the built-in math corpus, whose documents (cut to --prompt-tokens) are the prompts: every request has its
own prompt. Each of --clients asyncio tasks sends requests back to back until --requests are done, each a
streamed /v1/completions of --max-tokens greedy tokens (ignore_eos, so every request generates exactly
that many). Measured at the client: time to first token (request sent -> first token), time per output
token after the first, end-to-end latency, and output tokens/s over the whole run.

Correctness (seekforge): every request must answer 200, end with `data: [DONE]` once, report exactly
--max-tokens completion tokens in its usage and finish with "length"; a second, untimed pass at the same
concurrency asks for the token ids of every chunk and checks that each stream carries each of its
tokens exactly once (count, and decoded ids == streamed text); the server's own token counter must
agree with the clients'. Any failure exits non-zero. transformers is measured the same way and its
counts reported (it has no ignore_eos: an early EOS shortens a request, and the throughput counts the
tokens it really sent).

--mix (seekforge only) drives the features together instead:

    python bench/serve_load.py --mix --requests 200 --clients 16 --api-key sk-mix --json out.json

Each client sends, in rounds of MIX_ROUND shuffled, plain streamed completions (32 greedy tokens), echoed
prompts with logprobs (max_tokens 0 and 8), chat completions with tools (tool_choice auto and a named
function) and with response_format json_schema and json_object (each whole and streamed), requests invalid on
purpose (a schema that does not compile, an unknown tool in tool_choice, a prompt longer than the context),
requests with a wrong API key (with --api-key), and streams it hangs up after three events. Every answer is
checked: no 5xx; 400 and 401 come in the error envelope; every stream not hung up ends with one
`data: [DONE]`; chat answers validate as the openai package's ChatCompletion(Chunk); an echo has one logprob
entry per prompt token (the client's tokenization); tool calls name a tool, a named tool_choice gets its
call, and finished calls' arguments validate against the tool's schema (jsonschema); json_schema answers
validate against their schema, json_object answers that end by themselves are objects. Then the server as a
whole: seekforge_requests_total grew by the clients' answers (by endpoint and status), each hung-up stream
ended as an abort, nothing is left running or waiting, /health is 200, and a greedy request gives the text
it gave before the load. Any failure exits non-zero, naming each failure kind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    status: int
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0  # completion tokens (usage when reported, else content chunks)
    chunk_times: list[float] = field(default_factory=list)
    done_markers: int = 0
    finish: str | None = None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    error: str | None = None
    response_id: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(path: Path, preset: str, vocab: int) -> None:
    import torch

    import seekforge
    from seekforge.data.corpus import generate_documents
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.train(generate_documents(4000, seed=1), vocab_size=vocab)
    torch.manual_seed(0)
    cfg = seekforge.ModelConfig.preset(preset).replace(vocab_size=tok.vocab_size)
    seekforge.Transformer(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def make_prompts(path: Path, n: int, length: int) -> list[str]:
    from seekforge.data.corpus import generate_documents
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(path)
    prompts, docs, i = [], generate_documents(4 * n + 64, seed=2), 0
    while len(prompts) < n:
        ids: list[int] = []
        while len(ids) < length:  # long enough: join documents
            ids += tok.encode(docs[i % len(docs)] + "\n")
            i += 1
        prompts.append(tok.decode(ids[:length]))
    return prompts


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], url: str, log: Path, env: dict | None = None):
        self.name, self.url, self.log_path = name, url, log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, health: str, timeout: float = 900) -> float:
        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + health, timeout=60).status_code == 200:
                    return time.time() - start
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            res = Result(r.status_code)
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:300]
                return res
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                now = time.perf_counter()
                if data == "[DONE]":
                    res.done_markers += 1
                    continue
                if res.done_markers:
                    res.error = "data after [DONE]"
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])
                    continue
                res.response_id = event.get("id")
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("text") or ""
                    lp = choice.get("logprobs")
                    if lp and lp.get("tokens"):
                        res.ids += [int(t.split(":", 1)[1]) for t in lp["tokens"]]
                    if text or lp:
                        chunks += 1
                        res.text += text
                        if res.ttft is None:
                            res.ttft = now - t0
                    res.finish = choice.get("finish_reason") or res.finish
            res.latency = time.perf_counter() - t0
            if not res.tokens:
                res.tokens = chunks
            return res
    except httpx.HTTPError as err:
        return Result(0, error=f"{type(err).__name__}: {err}")


async def run_load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                   extra: dict) -> tuple[list[Result], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    results: list[Result | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                i, prompt = queue.get_nowait()
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, **extra}
                results[i] = await one_request(client, url, body)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t
    return results, wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.error is None and r.ttft is not None]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    lat = [r.latency for r in ok]
    tokens = sum(r.tokens for r in ok)
    out = {"server": name, "requests": len(results), "ok": len(ok), "wall_s": wall, "output_tokens": tokens,
           "output_tok_per_s": tokens / wall, "requests_per_s": len(ok) / wall}
    for key, vals in (("ttft_s", ttft), ("tpot_s", tpot), ("latency_s", lat)):
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "p50": pct(vals, 50), "p90": pct(vals, 90),
                        "p99": pct(vals, 99)}
    errors = [r.error or f"status {r.status}" for r in results if r not in ok]
    if errors:
        out["errors"] = errors[:5]
    return out


def check_seekforge(results: list[Result], max_tokens: int, with_ids: bool, tok) -> list[str]:
    problems = []
    ids = [r.response_id for r in results]
    if len(set(ids)) != len(ids):
        problems.append("duplicate response ids across requests")
    for i, r in enumerate(results):
        where = f"request {i}"
        if r.status != 200 or r.error:
            problems.append(f"{where}: status {r.status} {r.error}")
            continue
        if r.done_markers != 1:
            problems.append(f"{where}: {r.done_markers} [DONE] markers")
        if r.finish != "length":
            problems.append(f"{where}: finish_reason {r.finish}")
        if r.tokens != max_tokens:
            problems.append(f"{where}: usage says {r.tokens} tokens, asked {max_tokens}")
        if with_ids:
            if len(r.ids) != max_tokens:
                problems.append(f"{where}: {len(r.ids)} token ids streamed, expected {max_tokens}")
            elif tok.decode(r.ids, skip_special_tokens=True) != r.text:
                problems.append(f"{where}: streamed text differs from its streamed tokens")
    return problems


def samples(url: str) -> list:
    """The server's Prometheus samples (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the server's samples of `name` whose labels include `labels`."""
    return sum(s.value for s in samples(url) if s.name == name and labels.items() <= s.labels.items())


# ---------------------------------------------------------------------------------------------- --mix
# The server's features mixed in one load, each answer validated against the OpenAI API (chat answers by the
# openai package's models, completions by hand) and the request's own promise (a schema, a tool, a prompt's tokens).

MIX_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}}]
# bounded, so that every answer under it ends by itself well within its max_tokens
MIX_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
BAD_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}  # a reference to nothing
# one round of the mix (plain streams the most common); the load runs rounds, each shuffled
MIX_ROUND = ("stream",) * 3 + (
    "abort", "echo_score", "echo_score", "echo", "tools_auto", "tools_auto_stream", "tools_named", "tools_named_stream",
    "schema", "schema_stream", "json_object", "json_object_stream", "bad_schema", "bad_tool", "too_long", "bad_key")
# max_tokens by kind: room for a forced tool call (~160-210 tokens where the tokenizer spells its markers byte by
# byte) and for an answer under MIX_SCHEMA (< 80 tokens) to end by themselves
MIX_TOKENS = {"stream": 32, "echo": 8, "tools": 320, "schema": 200, "json_object": 64}
ABORT_AFTER = 3  # an aborting client hangs up after this many events


@dataclass
class MixRequest:
    kind: str
    endpoint: str
    body: dict
    key: str | None  # the API key sent (None: none)
    status: int  # the status it must get
    abort_after: int = 0  # hang up after this many events (0: read the stream to its end)


@dataclass
class MixReply:
    status: int
    body: object = None  # a whole answer's JSON (or the error envelope)
    events: list[dict] = field(default_factory=list)  # a stream's events, [DONE] left out
    done_markers: int = 0
    after_done: int = 0  # events after [DONE]
    aborted: bool = False  # the client hung up mid-stream
    latency: float = 0.0
    error: str | None = None  # no answer (transport) or an answer that is not JSON


def mix_plan(n: int, prompts: list[str], model: str, tok, max_model_len: int, api_key: str | None,
             seed: int = 0) -> list[MixRequest]:
    """`n` requests: rounds of MIX_ROUND (less bad_key without an API key), each round shuffled."""
    kinds = [k for k in MIX_ROUND if api_key or k != "bad_key"]
    rng, order = random.Random(seed), []
    while len(order) < n:
        order += rng.sample(kinds, len(kinds))
    long_prompt = prompts[0]
    while len(tok.encode_prompt(long_prompt)) <= max_model_len:
        long_prompt += " " + long_prompt
    return [_mix_request(kind, i, prompts[i % len(prompts)], long_prompt, model, tok, max_model_len, api_key)
            for i, kind in enumerate(order[:n])]


def _mix_request(kind: str, i: int, prompt: str, long_prompt: str, model: str, tok, max_model_len: int,
                 api_key: str | None) -> MixRequest:
    completion = {"model": model, "prompt": prompt, "temperature": 0}
    stream = {**completion, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
              "max_tokens": MIX_TOKENS["stream"]}
    chat = {"model": model, "messages": [{"role": "user", "content": prompt[:160]}], "temperature": 1.0, "seed": i,
            "stream": kind.endswith("_stream")}
    family = kind.removesuffix("_stream")
    if family in ("tools_auto", "tools_named", "bad_tool"):
        choice = {"tools_auto": "auto", "tools_named": {"type": "function", "function": {"name": "get_weather"}},
                  "bad_tool": {"type": "function", "function": {"name": "no_such_tool"}}}[family]
        return MixRequest(kind, "/v1/chat/completions", {**chat, "tools": MIX_TOOLS, "tool_choice": choice,
                                                         "max_tokens": MIX_TOKENS["tools"]}, api_key,
                          400 if family == "bad_tool" else 200)
    if family in ("schema", "json_object", "bad_schema"):
        fmt = {"type": "json_object"} if family == "json_object" else {"type": "json_schema", "json_schema": {
            "name": "person", "schema": BAD_SCHEMA if family == "bad_schema" else MIX_SCHEMA, "strict": True}}
        tokens = MIX_TOKENS["json_object" if family == "json_object" else "schema"]
        return MixRequest(kind, "/v1/chat/completions", {**chat, "response_format": fmt, "max_tokens": tokens},
                          api_key, 400 if family == "bad_schema" else 200)
    if kind in ("echo_score", "echo"):
        return MixRequest(kind, "/v1/completions", {
            **completion, "echo": True, "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True,
            "max_tokens": 0 if kind == "echo_score" else MIX_TOKENS["echo"]}, api_key, 200)
    if kind == "abort":
        # room for as many tokens as the context holds: it is cut long before its end. Sampled: a random model's
        # greedy text may be bytes that never make UTF-8, held back (as vLLM does) until the stream's last event
        room = max_model_len - len(tok.encode_prompt(prompt))
        return MixRequest(kind, "/v1/completions", {**stream, "max_tokens": room, "temperature": 1.0, "seed": i},
                          api_key, 200, ABORT_AFTER)
    if kind == "too_long":
        return MixRequest(kind, "/v1/completions", {**completion, "prompt": long_prompt}, api_key, 400)
    if kind == "bad_key":
        return MixRequest(kind, "/v1/completions", stream, "wrong-" + api_key, 401)
    return MixRequest(kind, "/v1/completions", stream, api_key, 200)


async def send_mix(client: httpx.AsyncClient, url: str, req: MixRequest) -> MixReply:
    headers = {"Authorization": f"Bearer {req.key}"} if req.key else {}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + req.endpoint, json=req.body, headers=headers) as r:
            reply = MixReply(r.status_code)
            if r.status_code != 200 or not req.body.get("stream"):
                text = (await r.aread()).decode()
                try:
                    reply.body = json.loads(text)
                except ValueError:
                    reply.error = f"not JSON: {text[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line[6:] == "[DONE]":
                        reply.done_markers += 1
                        continue
                    reply.after_done += reply.done_markers > 0
                    reply.events.append(json.loads(line[6:]))
                    if req.abort_after and len(reply.events) >= req.abort_after and not reply.done_markers:
                        reply.aborted = True  # leaving the block closes the connection mid-stream
                        break
            reply.latency = time.perf_counter() - t0
            return reply
    except (httpx.HTTPError, ValueError) as err:
        return MixReply(0, error=f"{type(err).__name__}: {err}", latency=time.perf_counter() - t0)


def check_mix(req: MixRequest, reply: MixReply, tok) -> list[tuple[str, str]]:
    """What is wrong with `reply` to `req`, as (failure kind, detail) pairs; none when it is right."""
    if reply.status >= 500 or reply.status == 0:
        return [("5xx" if reply.status else "no answer", f"{reply.status} {reply.error or reply.body}"[:300])]
    if reply.status != req.status:
        return [("wrong status", f"{reply.status}, expected {req.status}: {str(reply.body)[:200]}")]
    if reply.error:
        return [("not JSON", reply.error)]
    if req.status != 200:
        return _check_envelope(reply.body, req.status)
    if req.body.get("stream"):
        problems = _check_stream_end(reply)
        if problems:
            return problems
    try:
        if req.endpoint == "/v1/completions":
            return _check_completion(req, reply, tok)
        return _check_chat(req, reply)
    except (KeyError, IndexError, TypeError, ValueError) as err:  # the openai models' ValidationError included
        return [("OpenAI schema", f"{type(err).__name__}: {err}"[:400])]


def _check_envelope(body, status: int) -> list[tuple[str, str]]:
    err = body.get("error") if isinstance(body, dict) else None
    if (not isinstance(err, dict) or set(body) != {"error"} or set(err) != {"message", "type", "param", "code"}
            or not isinstance(err["message"], str) or not err["message"]
            or err["type"] != "invalid_request_error"
            or (status == 401 and err["code"] != "invalid_api_key")):
        return [("error envelope", f"{status}: {str(body)[:300]}")]
    return []


def _check_stream_end(reply: MixReply) -> list[tuple[str, str]]:
    problems = [("stream error event", str(e)[:300]) for e in reply.events if "error" in e]
    if reply.aborted:
        return problems
    if reply.done_markers != 1 or reply.after_done:
        problems.append(("dropped stream" if not reply.done_markers else "stream end",
                         f"{reply.done_markers} [DONE] markers, {reply.after_done} events after one"))
    return problems


def _check_completion(req: MixRequest, reply: MixReply, tok) -> list[tuple[str, str]]:
    """A completion by hand: the openai package's Completion model wants a number where vLLM's echo (and ours) puts
    null, the first prompt token's logprob, and a finish_reason in every streamed chunk, which its client does not
    need (it parses without validating)."""
    if not req.body.get("stream"):
        return _check_echo(req, reply.body, tok)
    chunks = reply.events
    if not chunks:
        return [("stream format", "a stream without events")]
    problems = []
    if {(c["id"], c["object"]) for c in chunks} != {(chunks[0]["id"], "text_completion")}:
        problems.append(("stream format", f"ids and objects {({(c['id'], c['object']) for c in chunks})}"))
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    if reply.aborted:
        if finishes:
            problems.append(("abort", f"hung up after {len(chunks)} events, finish reasons {finishes}"))
        return problems
    usage = [c["usage"] for c in chunks if c.get("usage")]
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    if finishes != ["length"] or chunks[-1]["choices"] or len(usage) != 1 or not text:
        problems.append(("stream format", f"finish reasons {finishes}, {len(usage)} usage chunks (usage last: "
                                          f"{not chunks[-1]['choices']}), {len(text)} characters"))
    elif usage[0]["completion_tokens"] != req.body["max_tokens"]:
        problems.append(("usage", f"{usage[0]['completion_tokens']} completion tokens, asked {req.body['max_tokens']}"))
    return problems


def _check_echo(req: MixRequest, answer: dict, tok) -> list[tuple[str, str]]:
    """An echoed prompt: its text, one logprob entry per prompt token (the client's own tokenization; the first,
    which nothing predicts, without logprobs), then one per generated token."""
    prompt, generated = req.body["prompt"], req.body["max_tokens"]
    want = tok.encode_prompt(prompt)
    (choice,) = answer["choices"]
    lp = choice["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    problems = []
    if answer["object"] != "text_completion" or not answer["id"]:
        problems.append(("OpenAI schema", f"object {answer['object']!r}, id {answer['id']!r}"))
    if not choice["text"].startswith(prompt) or (generated == 0 and choice["text"] != prompt):
        problems.append(("echo text", f"text {choice['text'][:80]!r} does not echo the prompt {prompt[:80]!r}"))
    if ids[:len(want)] != want or len(ids) != len(want) + generated:
        problems.append(("echo logprobs", f"{len(ids)} entries for {len(want)} prompt + {generated} generated tokens"
                                          f" (ids match the prompt's: {ids[:len(want)] == want})"))
    lps, tops, offsets = lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]
    if not (len(lps) == len(tops) == len(offsets) == len(ids)) or lps[0] is not None or tops[0] is not None or any(
            not isinstance(v, float) or not -9999 <= v <= 0 or len(t) != 1 or v > max(t.values()) + 1e-4
            for v, t in zip(lps[1:], tops[1:])):
        problems.append(("echo logprobs", f"logprobs out of shape or range: {lps[:4]}, {tops[:4]}"))
    usage = answer["usage"]
    if (usage["prompt_tokens"], usage["completion_tokens"], choice["finish_reason"]) != (len(want), generated,
                                                                                          "length"):
        problems.append(("usage", f"usage {usage}, finish {choice['finish_reason']}; prompt has {len(want)} tokens"))
    return problems


def _check_chat(req: MixRequest, reply: MixReply) -> list[tuple[str, str]]:
    """A chat answer (whole, or assembled from its stream) against the OpenAI schema and what the request asked:
    a named tool's call, JSON under the schema, a JSON object."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    if req.body["stream"]:
        message, finish, problems = _assemble_chat([ChatCompletionChunk.model_validate(e) for e in reply.events])
    else:
        answer = ChatCompletion.model_validate(reply.body)
        (choice,) = answer.choices
        message, finish, problems = choice.message.model_dump(), choice.finish_reason, []
    calls = message.get("tool_calls") or []
    family = req.kind.removesuffix("_stream")
    if family.startswith("tools"):
        problems += _check_calls(calls, finish, req.body["tool_choice"])
    elif calls:
        problems.append(("tool calls", f"{len(calls)} tool calls in an answer without tools"))
    if family in ("schema", "json_object") and (finish == "stop" or family == "schema"):
        import jsonschema

        try:
            value = json.loads(message["content"] or "")
            jsonschema.validate(value, MIX_SCHEMA if family == "schema" else {"type": "object"})
        except (ValueError, jsonschema.ValidationError) as err:
            problems.append(("json " + family.replace("_", " "), f"finish {finish}, {str(err).splitlines()[0][:200]}: "
                                                                 f"{(message['content'] or '')[:200]!r}"))
    return problems


def _assemble_chat(chunks) -> tuple[dict, str | None, list[tuple[str, str]]]:
    """The message a chat stream's deltas make (OpenAI's rules: the first delta says the role; a tool call's first
    delta carries its id, type and name, later ones pieces of its arguments), its finish reason, what breaks them."""
    problems, content, calls, finishes, role = [], "", [], [], None
    if len({c.id for c in chunks}) != 1:
        problems.append(("stream format", f"{len({c.id for c in chunks})} ids in one stream"))
    for chunk in chunks:
        for ch in chunk.choices:
            if finishes:
                problems.append(("stream format", "a delta after the finish reason"))
            role = role or ch.delta.role
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index == len(calls) and d.id and d.type == "function" and d.function and d.function.name:
                    calls.append({"id": d.id, "type": "function", "function": {"name": d.function.name,
                                                                                "arguments": ""}})
                elif d.index != len(calls) - 1 or d.id or d.type or (d.function and d.function.name):
                    problems.append(("tool calls", f"tool call delta out of order: {d}"))
                    continue
                if d.function and d.function.arguments:
                    calls[-1]["function"]["arguments"] += d.function.arguments
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    if role != "assistant" or len(finishes) != 1:
        problems.append(("stream format", f"role {role}, finish reasons {finishes}"))
    return {"role": role, "content": content or None, "tool_calls": calls or None}, (finishes or [None])[0], problems


def _check_calls(calls: list[dict], finish: str | None, choice) -> list[tuple[str, str]]:
    """Each call names a tool and, once the answer ended by itself, carries arguments valid under its schema; a
    named tool_choice gets one call of that function."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in MIX_TOOLS}
    problems = []
    if len({c["id"] for c in calls}) != len(calls) or any(c["function"]["name"] not in schemas for c in calls):
        problems.append(("tool calls", f"ids not unique or unknown function: {calls}"))
        return problems
    if (finish == "tool_calls") != bool(calls) and finish != "length":
        problems.append(("tool calls", f"finish reason {finish} with {len(calls)} calls"))
    if isinstance(choice, dict) and (finish != "tool_calls" or [c["function"]["name"] for c in calls]
                                     != [choice["function"]["name"]]):
        problems.append(("tool calls", f"tool_choice names {choice['function']['name']}: got finish {finish}, "
                                       f"calls {calls}"))
    if finish == "tool_calls":
        for c in calls:
            try:
                jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])
            except (ValueError, jsonschema.ValidationError) as err:
                problems.append(("tool calls", f"arguments {c['function']['arguments'][:200]!r}: "
                                               f"{str(err).splitlines()[0][:200]}"))
    return problems


async def _mix_load(url: str, plan: list[MixRequest], clients: int) -> tuple[list[MixReply], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(plan)):
        queue.put_nowait(i)
    replies: list[MixReply | None] = [None] * len(plan)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                replies[i] = await send_mix(client, url, plan[i])

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return replies, time.perf_counter() - t


def _request_counts(url: str) -> collections.Counter:
    """seekforge_requests_total of the two generation endpoints, by (endpoint, status)."""
    return collections.Counter({(s.labels["endpoint"], s.labels["status"]): s.value for s in samples(url)
                                if s.name == "seekforge_requests_total" and s.labels["endpoint"] in
                                ("/v1/completions", "/v1/chat/completions")})


def _greedy(url: str, model: str, prompt: str, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def run_mix(url: str, model: str, tok, prompts: list[str], requests: int, clients: int, max_model_len: int,
            api_key: str | None = None, settle_s: float = 30.0) -> tuple[dict, list[tuple[str, str]]]:
    """Drive the server at `url` (serving `model`, tokenizer `tok`, context `max_model_len`, API key `api_key`)
    with `requests` mixed requests from `clients` concurrent clients, then check the server as a whole: its
    request counters against the clients' answers, no generation left running, healthy, and the same greedy text
    for a plain request as before the load. Returns (summary, failures as (kind, detail) pairs)."""
    plan = mix_plan(requests, prompts, model, tok, max_model_len, api_key)
    before_text = _greedy(url, model, prompts[0], api_key)
    counts_before = _request_counts(url)
    aborts_before = metric(url, "seekforge_request_finished_total", finish_reason="abort")
    replies, wall = asyncio.run(_mix_load(url, plan, clients))

    failures: list[tuple[str, str]] = []
    for i, (req, reply) in enumerate(zip(plan, replies)):
        failures += [(kind, f"request {i} ({req.kind}): {detail}") for kind, detail in check_mix(req, reply, tok)]
    sent = collections.Counter((req.endpoint, str(reply.status)) for req, reply in zip(plan, replies) if reply.status)
    aborted = sum(r.aborted for r in replies)
    # an aborted request is counted, and its generation ended, once the server has seen the client go
    deadline, state = time.time() + settle_s, {}
    while True:
        state = {"counted": _request_counts(url) - counts_before,
                 "aborted": metric(url, "seekforge_request_finished_total", finish_reason="abort") - aborts_before,
                 "running": metric(url, "seekforge_requests_running"),
                 "waiting": metric(url, "seekforge_requests_waiting")}
        if (state["counted"] == sent and state["aborted"] == aborted and not state["running"] and not state["waiting"]
                or time.time() > deadline):
            break
        time.sleep(0.2)
    if state["counted"] != sent:
        failures.append(("metrics", f"seekforge_requests_total grew by {dict(state['counted'])}, the clients got "
                                    f"{dict(sent)}"))
    if state["aborted"] != aborted:
        failures.append(("abort", f"{state['aborted']:g} generations ended as aborted, {aborted} clients hung up"))
    if state["running"] or state["waiting"]:
        failures.append(("leak", f"{state['running']:g} running and {state['waiting']:g} waiting after the load"))
    health = httpx.get(url + "/health", timeout=60).status_code
    if health != 200:
        failures.append(("health", f"/health answers {health} after the load"))
    after_text = _greedy(url, model, prompts[0], api_key)
    if after_text != before_text:
        failures.append(("greedy drift", f"{before_text!r} before the load, {after_text!r} after"))

    by_kind: dict[str, dict] = {}
    for req, reply in zip(plan, replies):
        k = by_kind.setdefault(req.kind, {"requests": 0, "latency_s": []})
        k["requests"] += 1
        k["latency_s"].append(reply.latency)
    for k in by_kind.values():
        lat = k.pop("latency_s")
        k["latency_s"] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}
    statuses = collections.Counter(str(r.status) for r in replies)
    completed = sum(bool(req.body.get("stream")) and r.status == 200 and not r.aborted and r.done_markers == 1
                    for req, r in zip(plan, replies))
    summary = {"server": "seekforge --mix", "requests": len(plan), "clients": clients, "wall_s": wall,
               "requests_per_s": len(plan) / wall, "statuses": dict(statuses), "aborted_streams": aborted,
               "streams_completed": completed, "kinds": by_kind,
               "failure_kinds": dict(collections.Counter(kind for kind, _ in failures)),
               "failures": [f"{k}: {d}" for k, d in failures]}
    return summary, failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size for a built checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch bound (default: --clients)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the server's context (default 512; 1024 with --mix, whose tool prompts take ~500 tokens)")
    p.add_argument("--speculative-tokens", type=int, default=0)
    p.add_argument("--cuda-graphs", action="store_true", help="also run seekforge with CUDA graph decoding")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers serve comparison")
    p.add_argument("--transformers-requests", type=int, default=64,
                   help="requests for transformers (it may serve one at a time; default 64)")
    p.add_argument("--mix", action="store_true",
                   help="instead of the throughput runs: a mixed load (plain and aborted streams, echo logprobs, "
                        "tool calls, JSON schemas and objects, invalid requests) with every answer validated")
    p.add_argument("--api-key", default=None, help="serve with this API key (with --mix, some clients send a wrong "
                                                   "one and must get 401)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    args.max_model_len = args.max_model_len or (1024 if args.mix else 512)
    if args.api_key and not args.mix:
        p.error("--api-key is for --mix (the throughput clients send no key)")
    if args.mix and args.requests < len(MIX_ROUND):
        p.error(f"--mix needs --requests >= {len(MIX_ROUND)}, one round of its request kinds")
    if args.clients < 64 and not args.mix:
        print(f"note: {args.clients} clients (the acceptance load is 64 or more)", file=sys.stderr)

    import torch

    from seekforge.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        path = Path(args.model) if args.model else work / "model"
        if not args.model:
            t = time.time()
            build_checkpoint(path, args.preset, args.vocab)
            print(f"built a random {args.preset} checkpoint in {time.time() - t:.1f} s", file=sys.stderr)
        tok = Tokenizer.from_pretrained(path)
        prompts = make_prompts(path, args.requests, args.prompt_tokens)
        report = {"config": vars(args), "torch": torch.__version__,
                  "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "runs": []}
        failures: list[str] = []
        if args.mix:
            summary, problems = _run_seekforge_mix(path, prompts, args, work, tok)
            report["runs"].append(summary)
            report["failures"] = summary["failures"]
            _save(report, args.json)
            _mix_table(summary)
            if problems:
                print(f"FAILED: {len(problems)} problem(s) of kinds {summary['failure_kinds']}; first: "
                      f"{summary['failures'][:5]}", file=sys.stderr)
                return 1
            return 0

        # ------------------------------------------------------------------ seekforge
        for graphs in (False, True) if args.cuda_graphs else (False,):
            try:
                summary, problems = _run_seekforge(path, prompts, args, work, tok, graphs)
            except RuntimeError as err:
                summary = {"server": f"seekforge{' --cuda-graphs' * graphs}", "ok": 0, "errors": [str(err)[-2000:]]}
                problems = summary["errors"]
            report["runs"].append(summary)
            failures += problems
            _save(report, args.json)

        # ------------------------------------------------------------------ transformers
        if not args.no_transformers:
            exe = shutil.which("transformers")
            if exe is None:
                report["transformers_skipped"] = "no `transformers` command (pip install 'transformers[serving]')"
            else:
                # continuous batching first; its paged cache may not take the model (MLA's keys and values
                # differ in width), then one generate() per request, transformers serve's other mode
                for mode in ("--continuous-batching", "--no-continuous-batching"):
                    summary = _run_transformers(exe, mode, path, prompts[:args.transformers_requests], args, work)
                    if summary.get("ok"):
                        report["runs"].append(summary)
                        break
                    report.setdefault("transformers_attempts", []).append(summary)
                    _save(report, args.json)

        report["failures"] = failures
        print(json.dumps(report, indent=2))
        _save(report, args.json)
        _table(report)
        if failures:
            print(f"FAILED: {len(failures)} problem(s), first: {failures[:5]}", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve_seekforge(path: Path, args, work: Path, graphs: bool) -> ServerProcess:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "seekforge.cli", "serve", str(path), "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--served-model-name", "m", "--max-num-seqs", str(args.max_num_seqs or args.clients),
           "--max-model-len", str(args.max_model_len), "--max-waiting", str(max(1024, args.requests)),
           "--speculative-tokens", str(args.speculative_tokens), "--log-level", "warning"] + ["--cuda-graphs"] * graphs
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    name = "seekforge" + " --cuda-graphs" * graphs
    return ServerProcess(name, cmd, url, work / f"{name.replace(' ', '')}.log")


def _run_seekforge_mix(path: Path, prompts: list[str], args, work: Path, tok) -> tuple[dict, list[tuple[str, str]]]:
    server = _serve_seekforge(path, args, work, args.cuda_graphs)
    try:
        ready = server.wait_ready("/health")
        summary, failures = run_mix(server.url, "m", tok, prompts, args.requests, args.clients, args.max_model_len,
                                    args.api_key)
        summary["startup_s"] = ready
        return summary, failures
    finally:
        server.stop()


def _run_seekforge(path: Path, prompts: list[str], args, work: Path, tok, graphs: bool) -> tuple[dict, list[str]]:
    server = _serve_seekforge(path, args, work, graphs)
    url, name = server.url, server.name
    failures = []
    try:
        ready = server.wait_ready("/health")
        asyncio.run(run_load(url, "m", prompts[:4], 4, 8, {"ignore_eos": True}))  # warm-up
        before = metric(url, "seekforge_generation_tokens_total")
        results, wall = asyncio.run(run_load(url, "m", prompts, args.clients, args.max_tokens,
                                             {"ignore_eos": True, "stream_options": {"include_usage": True}}))
        served = metric(url, "seekforge_generation_tokens_total") - before
        summary = summarise(name, results, wall)
        summary["startup_s"] = ready
        failures += check_seekforge(results, args.max_tokens, False, tok)
        if served != args.requests * args.max_tokens:
            failures.append(f"{name}: server counted {served} generated tokens, clients asked "
                            f"{args.requests * args.max_tokens}")
        # untimed: every chunk names its token ids, each must arrive exactly once
        checked, _ = asyncio.run(run_load(url, "m", prompts, args.clients, args.max_tokens, {
            "ignore_eos": True, "stream_options": {"include_usage": True}, "logprobs": 0,
            "return_tokens_as_token_ids": True}))
        failures += check_seekforge(checked, args.max_tokens, True, tok)
        summary["validated_requests"] = len(results) + len(checked)
        return summary, failures
    finally:
        server.stop()


def _run_transformers(exe: str, mode: str, path: Path, prompts: list[str], args, work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [exe, "serve", str(path.resolve()), "--host", "127.0.0.1", "--port", str(port), mode,
           "--device", args.device, "--dtype", _hf_dtype(args.dtype), "--log-level", "warning"]
    server = ServerProcess("transformers", cmd, url, work / f"transformers{mode}.log")
    name = f"transformers serve {mode}"
    try:
        ready = server.wait_ready("/health")
        warm, _ = asyncio.run(run_load(url, str(path.resolve()), prompts[:2], 2, 4, {}))
        if any(r.error or r.status != 200 for r in warm):
            return {"server": name, "ok": 0, "errors": [r.error or f"status {r.status}" for r in warm][:2]}
        results, wall = asyncio.run(run_load(url, str(path.resolve()), prompts, args.clients, args.max_tokens, {}))
        summary = summarise(name, results, wall)
        summary["startup_s"] = ready
        return summary
    except RuntimeError as err:
        return {"server": name, "ok": 0, "errors": [str(err)[-2000:]]}
    finally:
        server.stop()


def _save(report: dict, path: str | None) -> None:
    """Written after every run, so that a run cut short still leaves what it measured."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _hf_dtype(dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "auto")


def _mix_table(summary: dict) -> None:
    print(f"\n{summary['requests']} mixed requests from {summary['clients']} clients in {summary['wall_s']:.1f} s; "
          f"statuses {summary['statuses']}; {summary['streams_completed']} streams completed, "
          f"{summary['aborted_streams']} aborted by their clients", file=sys.stderr)
    print("| kind | requests | latency p50 / p99 (s) |\n|---|---|---|", file=sys.stderr)
    for kind, k in sorted(summary["kinds"].items()):
        print(f"| {kind} | {k['requests']} | {k['latency_s']['p50']:.2f} / {k['latency_s']['p99']:.2f} |",
              file=sys.stderr)
    print(f"failures by kind: {summary['failure_kinds'] or 'none'}", file=sys.stderr)


def _table(report: dict) -> None:
    print("\n| server | ok/requests | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | latency p50 (s) |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r in report["runs"]:
        if "requests" not in r:
            print(f"| {r['server']} | failed: {str(r.get('errors'))[:200]} |", file=sys.stderr)
            continue
        ttft, tpot, lat = r.get("ttft_s", {}), r.get("tpot_s", {}), r.get("latency_s", {})
        print(f"| {r['server']} | {r['ok']}/{r['requests']} | {r['output_tok_per_s']:,.0f} | "
              f"{ttft.get('p50', float('nan')):.3f} / {ttft.get('p99', float('nan')):.3f} | "
              f"{1e3 * tpot.get('p50', float('nan')):.1f} / {1e3 * tpot.get('p99', float('nan')):.1f} | "
              f"{lat.get('p50', float('nan')):.2f} |", file=sys.stderr)
    if "transformers_skipped" in report:
        print(f"transformers: skipped ({report['transformers_skipped'][:300]})", file=sys.stderr)
    for attempt in report.get("transformers_attempts", []):
        print(f"{attempt['server']}: failed ({str(attempt.get('errors'))[:300]})", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
