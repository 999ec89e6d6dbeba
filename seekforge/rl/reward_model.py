"""The reward model as GRPO scores with it: in this process (batched, no gradient) or through an endpoint.

In-process, `LocalRewardModel` loads a `seekforge rm train` checkpoint (seekforge.model.reward) on the
trainer's device and scores (prompt text, completion text) pairs encoded as its training pairs were
(seekforge.train.reward.encode_response, with the reward model's own tokenizer), sorted by length into batches
of `batch_size`. Over HTTP, `HTTPRewardModel` posts {"prompts": [...], "responses": [...]} to `url` and reads
{"scores": [...]}, one float per response: what `reward_server` (`seekforge rm serve`) answers at /v1/rewards,
scoring each request in this process's way.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import torch

from seekforge.errors import ConfigError, SeekforgeError


@dataclass
class RewardModelConfig:
    path: str = ""  # a reward model directory (`seekforge rm train`'s DIR/final), scored in this process
    url: str = ""  # or a scoring endpoint (`seekforge rm serve`'s http://HOST:PORT/v1/rewards)
    batch_size: int = 16  # sequences per forward (in-process)
    max_len: int = 2048  # tokens scored per sequence (its last ones)
    dtype: Literal["float32", "bfloat16"] = "float32"  # in-process weights
    timeout_s: float = 120.0  # per HTTP request

    def __post_init__(self) -> None:
        if self.path and self.url:
            raise ConfigError("reward_model: give path (in-process) or url (an endpoint), not both")
        if self.batch_size < 1 or self.max_len < 1:
            raise ConfigError("reward_model: batch_size and max_len must be >= 1")

    @property
    def given(self) -> bool:
        return bool(self.path or self.url)


class LocalRewardModel:
    """A reward model in this process."""

    def __init__(self, path, device="cpu", batch_size: int = 16, max_len: int = 2048, dtype=torch.float32):
        from seekforge.model.reward import is_reward_model, load_reward_model
        from seekforge.tokenizer import Tokenizer

        if not is_reward_model(path):
            raise ConfigError(f"reward_model.path {path} is not a reward model (no ...ForSequenceClassification in "
                              f"its config.json); train one with `seekforge rm train`")
        self.device = torch.device(device)
        self.model = load_reward_model(path, dtype=dtype, device=self.device).eval().requires_grad_(False)
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.batch_size, self.max_len = batch_size, max_len

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from seekforge.train.reward import collate_sequences, encode_response

        ids = [encode_response(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            tokens = collate_sequences([ids[i] for i in chunk], self.max_len, self.model.pad_id).to(self.device)
            for i, value in zip(chunk, self.model(tokens).tolist()):
                out[i] = value
        return out


class HTTPRewardModel:
    """A reward model behind a scoring endpoint."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url, self.timeout_s = url, timeout_s

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                scores = json.loads(reply.read())["scores"]
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            raise SeekforgeError(f"reward model endpoint {self.url}: {err}; check that `seekforge rm serve` runs "
                                 f"there") from err
        if len(scores) != len(responses):
            raise SeekforgeError(f"reward model endpoint {self.url} returned {len(scores)} scores for "
                                 f"{len(responses)} responses")
        return [float(s) for s in scores]


def reward_model_client(cfg: RewardModelConfig, device="cpu") -> LocalRewardModel | HTTPRewardModel:
    if cfg.url:
        return HTTPRewardModel(cfg.url, cfg.timeout_s)
    return LocalRewardModel(cfg.path, device, cfg.batch_size, cfg.max_len, getattr(torch, cfg.dtype))


ROUTE = "/v1/rewards"


def reward_server(scorer: LocalRewardModel, host: str = "127.0.0.1", port: int = 8001) -> ThreadingHTTPServer:
    """An HTTP server answering POST /v1/rewards with `scorer`'s scores (one request scored at a time) and GET
    /health; call serve_forever() on it (port 0: a free port, in server_address)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._reply(200, {"status": "ok"}) if self.path == "/health" else self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != ROUTE:
                return self._reply(404, {"error": f"not found; POST {ROUTE}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts, responses = body["prompts"], body["responses"]
                if not (isinstance(prompts, list) and isinstance(responses, list) and len(prompts) == len(responses)
                        and all(isinstance(x, str) for x in prompts + responses)):
                    raise ValueError("prompts and responses must be lists of strings of one length")
            except (ValueError, KeyError, TypeError) as err:
                return self._reply(400, {"error": f"expected {{\"prompts\": [str], \"responses\": [str]}}: {err}"})
            with lock:
                scores = scorer.score(prompts, responses)
            self._reply(200, {"scores": scores})

        def log_message(self, *args) -> None:  # quiet: a training run's endpoint, called every step
            pass

    return ThreadingHTTPServer((host, port), Handler)
