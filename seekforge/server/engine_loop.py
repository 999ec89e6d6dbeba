"""The engine driver: one background thread owns the model and runs `LLM.step()`; the HTTP side talks
to it only through a command queue (thread-safe) and asyncio queues (filled on the event loop).

    loop = EngineLoop(make_llm, metrics)      # make_llm() builds the LLM inside the thread
    loop.start(asyncio.get_running_loop())
    gen = Generation(loop, [prompt_ids], params)
    await gen.admit()                         # raises ConfigError (-> 400) or QueueFullError (-> 503)
    async for prompt_index, out in gen: ...   # RequestOutputs with deltas, until all are finished
    gen.close()                               # aborts whatever is unfinished (client gone): frees its cache

Commands (add, abort) are applied between steps, so the engine is never touched by two threads. The
engine checks every request before queueing it, so a bad request fails alone at admission. If a step
raises anyway (a bug, out of memory), the requests in flight fail with an error, are aborted, and the
loop goes on serving the next ones; the error is logged and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from seekforge.engine import LLM, RequestOutput, SamplingParams
from seekforge.errors import SeekforgeError
from seekforge.model.moe import add_load
from seekforge.server.metrics import ServerMetrics

log = logging.getLogger("seekforge.server")

_PUBLISH_EVERY = 0.5  # seconds between refreshes of the engine gauges while busy


class EngineFailure(Exception):
    """A step raised: the requests it was running are lost (the message says why)."""


@dataclass
class _Live:
    """The engine thread's view of one admitted request."""

    request_id: str
    tag: int  # the prompt's index within its HTTP request
    sink: asyncio.Queue
    arrival: float
    record: bool  # count it in the token and latency metrics (health probes are not)
    first_token: float | None = None
    last_emit: dict[int, float] = field(default_factory=dict)  # completion index -> time of its last tokens


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    live: _Live
    admitted: asyncio.Future


class EngineLoop:
    def __init__(self, make_llm: Callable[[], LLM], metrics: ServerMetrics,
                 on_fatal: Callable[[], None] = lambda: None):
        self._make_llm = make_llm
        self.metrics = metrics
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self.llm: LLM | None = None  # set once loaded; read-only facts (tokenizer, max_model_len) for the HTTP side
        self.state = "starting"  # -> "ready" | "failed" -> "stopped"
        self.error: str | None = None
        self._ready = threading.Event()
        self._expert_sums: dict[int, object] = {}  # tokens per expert by MoE layer id, since the last publish
        self._last_publish = 0.0
        self._waiting = 0

    # ------------------------------------------------------------------ HTTP side (event loop thread)
    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._thread = threading.Thread(target=self._main, name="seekforge-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)
        if self.state != "failed":
            self.state = "stopped"

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tag: int,
               sink: asyncio.Queue, arrival: float, record: bool = True) -> asyncio.Future:
        """Queue a request for the engine; the future resolves once it is admitted (or fails).
        `arrival` is the time.perf_counter() of the HTTP request, the origin of time to first token."""
        admitted = self._aloop.create_future()
        live = _Live(request_id, tag, sink, arrival, record)
        self._commands.put(("add", _Add(request_id, prompt_ids, params, live, admitted)))
        return admitted

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self.llm = self._make_llm()
            # one real generation before declaring readiness: the first request should not pay for warm-up
            self.llm.generate([[self.probe_token()]], SamplingParams(max_tokens=1, temperature=0))
        except Exception as err:  # noqa: BLE001 - any failure to load ends the server, with its reason
            if isinstance(err, SeekforgeError):  # the user's input: the message says it all
                log.error("seekforge: the engine failed to start: %s", err)
            else:
                log.exception("seekforge: the engine failed to start")
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"
            self._ready.set()
            self._on_fatal()
            return
        self.state = "ready"
        self._ready.set()
        try:
            self._publish(force=True)
            self._serve()
        except Exception as err:  # noqa: BLE001 - a bug in the loop itself: fail loudly, stop the server
            log.exception("seekforge: the engine loop crashed; stopping the server")
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"
            self._fail_all(EngineFailure(f"the engine loop crashed ({self.error})"))
            self._on_fatal()
        finally:
            for live in list(self._live.values()):
                self._abort(live.request_id, "abort")
            try:
                self.llm.close()  # the disk KV tier's queued writes land before the process ends
            except Exception:  # noqa: BLE001 - shutting down: log it, lose nothing else
                log.exception("seekforge: closing the engine failed")

    def probe_token(self) -> int:
        """The one-token prompt of warm-up and health probes."""
        tok = self.llm.tokenizer
        return tok.bos_id if tok is not None else 0

    def _serve(self) -> None:
        llm = self.llm
        while True:
            busy = llm.has_unfinished_requests()
            try:
                cmd = self._commands.get_nowait() if busy else self._commands.get(timeout=_PUBLISH_EVERY)
            except queue.Empty:
                cmd = None
                if not busy:
                    self._publish(force=True)
                    continue
            while cmd is not None:
                kind, payload = cmd
                if kind == "stop":
                    return
                self._add(payload) if kind == "add" else self._abort(payload, "abort")
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if not llm.has_unfinished_requests():
                continue
            try:
                outs = llm.step()
                self._dispatch(outs)
                # the step's tokens per expert, summed before the next step overwrites a captured graph's
                add_load(self._expert_sums, llm.expert_load)
                self._publish()
            except Exception as err:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("seekforge: engine step failed; failing the requests in flight")
                self.metrics.engine_errors.inc()
                self._fail_all(EngineFailure(f"the engine failed while generating ({type(err).__name__}: {err}); "
                                             "the request was dropped, retry it"))

    def _add(self, cmd: _Add) -> None:
        try:
            self.llm.add_request(cmd.prompt_ids, cmd.params, request_id=cmd.request_id)
        except Exception as err:  # noqa: BLE001 - ConfigError/QueueFullError and anything else go to the caller
            self._resolve(cmd.admitted, err)
            return
        self._live[cmd.request_id] = cmd.live
        if cmd.live.record:
            self.metrics.prompt_tokens.inc(len(cmd.prompt_ids))
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)
        self._resolve(cmd.admitted, None)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def settle():
            if not future.done():  # the HTTP side may have given up (client gone)
                future.set_exception(error) if error is not None else future.set_result(None)
        self._aloop.call_soon_threadsafe(settle)

    def _abort(self, request_id: str, reason: str) -> None:
        live = self._live.pop(request_id, None)
        try:
            self.llm.abort(request_id)
        except Exception:  # noqa: BLE001 - after a failed step the engine may be inconsistent; keep going
            log.exception("seekforge: aborting %s failed", request_id)
        if live is not None:
            self._retire(live, reason)

    def _retire(self, live: _Live, reason: str) -> None:
        if not live.record:
            return
        if live.first_token is None:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)
        else:
            self.metrics.running.dec()
        self.metrics.finished.labels(finish_reason=reason).inc()

    def _fail_all(self, err: EngineFailure) -> None:
        batch = [(live.sink, (live.tag, err)) for live in self._live.values()]
        for rid in list(self._live):
            self._abort(rid, "error")
        self._deliver(batch)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        batch = []
        m = self.metrics
        for out in outs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            batch.append((live.sink, (live.tag, out)))
            if live.record:
                new = 0
                for c in out.outputs:
                    k = len(c.delta_token_ids)
                    if not k:
                        continue
                    new += k
                    last = live.last_emit.get(c.index)
                    if last is not None:
                        for _ in range(k):
                            m.itl.observe((now - last) / k)
                    live.last_emit[c.index] = now
                if new:
                    m.generation_tokens.inc(new)
                    if live.first_token is None:
                        live.first_token = now
                        m.ttft.observe(now - live.arrival)
                        self._waiting -= 1
                        m.waiting.set(self._waiting)
                        m.running.inc()
            if out.finished:
                del self._live[out.request_id]
                if live.record:
                    m.e2e.observe(now - live.arrival)
                    reasons = {c.finish_reason for c in out.outputs}
                    self._retire(live, "length" if "length" in reasons else next(iter(reasons)) or "stop")
        self._deliver(batch)

    def _deliver(self, batch: list) -> None:
        if batch:
            self._aloop.call_soon_threadsafe(_put_all, batch)

    def _publish(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_publish < _PUBLISH_EVERY:
            return
        self._last_publish = now
        self.metrics.record_engine_stats(self.llm.stats())
        if self._expert_sums:
            sums, self._expert_sums = self._expert_sums, {}
            self.metrics.record_expert_load({i: t.tolist() for i, t in sums.items()})


def _put_all(batch: list) -> None:
    for sink, item in batch:
        sink.put_nowait(item)



class Generation:
    """The engine requests of one HTTP request (one per prompt), their outputs merged as they come."""

    def __init__(self, engine: EngineLoop, prompts: list[list[int]], params: SamplingParams, *,
                 prefix: str = "req", record: bool = True, arrival: float | None = None):
        self.engine = engine
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.prompts = prompts
        self.params = params
        self.record = record
        self.request_ids = [engine.new_request_id(prefix) for _ in prompts]
        self.queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(range(len(prompts)))
        self._submitted = False

    async def admit(self) -> None:
        """Submit every prompt and wait until the engine took them all; on any refusal abort the rest and
        raise the first error (the engine's ConfigError or QueueFullError)."""
        self._submitted = True
        futures = [self.engine.submit(rid, ids, self.params, tag, self.queue, self.arrival, self.record)
                   for tag, (rid, ids) in enumerate(zip(self.request_ids, self.prompts))]
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.close()
            raise errors[0]

    def __aiter__(self):
        return self._outputs()

    async def _outputs(self):
        while self._unfinished:
            tag, item = await self.queue.get()
            if isinstance(item, BaseException):
                self._unfinished.discard(tag)
                raise item
            if item.finished:
                self._unfinished.discard(tag)
            yield tag, item

    def close(self) -> None:
        """Abort what has not finished (idempotent; aborting a finished request does nothing)."""
        if self._submitted:
            for tag in self._unfinished:
                self.engine.abort(self.request_ids[tag])
            self._unfinished = set()
