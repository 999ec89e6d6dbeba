"""The two generation endpoints: OpenAI requests in, engine requests through the engine loop, OpenAI
responses (whole, or as server-sent events) out.

Prompts are rendered and tokenized here, off the event loop, so that the context check can name both
numbers (prompt tokens and max_tokens) before anything is queued. Streams send one chunk per choice
per engine step that changed it; concatenating a choice's deltas gives exactly the non-streamed
message, reasoning split included.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from seekforge.engine import Logprob, QueueFullError, RequestOutput, SamplingParams
from seekforge.errors import ConfigError
from seekforge.server.config import ServerConfig
from seekforge.server.engine_loop import EngineFailure, EngineLoop, Generation
from seekforge.server.protocol import (
    APIError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta,
    ChatLogprobs, ChatResponseMessage, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
    DeltaFunctionCall, DeltaToolCall, NamedToolChoice, PromptTokensDetails, ResponseFunctionCall, ResponseToolCall,
    TokenLogprob, TopLogprob, Usage, bad_request,
)
from seekforge.server.tool_calls import CallDelta, ToolCallParser, forced_call_tag
from seekforge.reasoning import ReasoningParser, prompt_opens_reasoning

_MIN_LOGPROB = -9999.0  # what OpenAI reports for an impossible token; JSON has no -inf


def engine_error(err: BaseException) -> APIError:
    """The HTTP answer for an engine refusal or failure."""
    if isinstance(err, QueueFullError):
        return APIError(503, f"the server is at capacity: {err}", type="server_error", code="queue_full")
    if isinstance(err, ConfigError):
        return bad_request(str(err))
    if isinstance(err, EngineFailure):
        return APIError(500, str(err), type="server_error", code="engine_error")
    raise err


def json_response(model, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


class OpenAIServing:
    def __init__(self, engine: EngineLoop, config: ServerConfig):
        self.engine = engine
        self.config = config
        self._grammars = None

    @property
    def grammars(self):
        """The grammar compiler of the served model (seekforge.engine.grammar), made on first use."""
        if self._grammars is None:
            from seekforge.engine.grammar import Grammars

            llm = self.engine.llm
            self._grammars = Grammars(llm.tokenizer, llm.cfg.vocab_size, llm.eos_ids)
        return self._grammars

    # ------------------------------------------------------------------ shared checks
    def _check_model(self, name: str) -> None:
        if name not in self.config.model_names:
            served = ", ".join(f"`{n}`" for n in self.config.model_names)
            raise APIError(404, f"The model `{name}` does not exist: this server serves {served} (see /v1/models)",
                           param="model", code="model_not_found")

    @property
    def _tokenizer(self):
        tok = self.engine.llm.tokenizer
        if tok is None:
            raise bad_request("this checkpoint has no tokenizer.json: only token-id prompts to /v1/completions "
                              "can be served")
        return tok

    def _sampling(self, req, prompts: list[list[int]], constraint=None) -> SamplingParams:
        """The engine's parameters; max_tokens 0 (scoring an echoed prompt) runs one token, which the
        answer leaves out."""
        max_len = self.engine.llm.max_model_len
        longest = max(len(p) for p in prompts)
        asked = req.requested_max_tokens
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if asked is None:
            if longest >= max_len:
                raise bad_request(f"This model's maximum context length is {max_len} tokens, but the prompt has "
                                  f"{longest} tokens, leaving no room to generate: shorten the prompt", "messages"
                                  if isinstance(req, ChatCompletionRequest) else "prompt")
            asked = max_len - longest
        elif longest + asked > max_len:
            raise bad_request(f"This model's maximum context length is {max_len} tokens, but {longest + asked} were "
                              f"requested ({longest} in the prompt + {asked} {name}): shorten the prompt or lower "
                              f"{name}", name)
        sequences = req.n * len(prompts)
        if sequences > self.config.engine.max_waiting:
            raise bad_request(f"{sequences} sequences (n={req.n} x {len(prompts)} prompt(s)) are more than this "
                              f"server queues at once (max_waiting={self.config.engine.max_waiting})", "n")
        kwargs = req.sampling_kwargs()
        if kwargs.get("top_k", 0) >= self.engine.llm.cfg.vocab_size:
            kwargs["top_k"] = 0  # keeping the whole vocabulary is no top-k at all
        echo_k = req.logprobs if getattr(req, "echo", False) else None
        try:
            params = SamplingParams(**kwargs, max_tokens=max(asked, 1), logprobs=req.logprobs_k,
                                    constraint=constraint, prompt_logprobs=echo_k)
            if self._dual_chain_applies(constraint):
                params = self.config.dual_chain.sampling_params(params, self.engine.llm.tokenizer)
            return params
        except ConfigError as err:
            raise bad_request(str(err)) from None

    def _dual_chain_applies(self, constraint=None) -> bool:
        """Whether the rule chain runs beside this request: the server has one, the model a tokenizer, and the
        request no grammar (whose tokens an insertion would bypass)."""
        return self.config.dual_chain is not None and self.engine.llm.tokenizer is not None and constraint is None

    async def _decide(self, out: RequestOutput, question: str | None) -> dict:
        """The dual chain's decision on a finished request, as the response's extension field (the rule chain
        may take up to its timeout: off the event loop)."""
        decision = await run_in_threadpool(self.config.dual_chain.decide, out, self.engine.llm.tokenizer, question)
        return decision.as_dict()

    async def _start(self, prompts: list[list[int]], params: SamplingParams, rid: str,
                     arrival: float) -> Generation:
        """A generation admitted to the engine (a full queue or a request it refuses is the client's error)."""
        gen = Generation(self.engine, prompts, params, prefix=rid, arrival=arrival)
        try:
            await gen.admit()
        except (QueueFullError, ConfigError) as err:
            gen.close()
            raise engine_error(err) from None
        except BaseException:
            gen.close()
            raise
        return gen

    def _stream(self, gen: Generation, events: AsyncIterator[str], finals: dict[int, RequestOutput], req,
                chunk_type, rid: str, created: int) -> GenerationStream:
        """`events` as server-sent events, then the usage chunk (a `chunk_type` without choices) if asked."""
        def usage() -> str:
            return sse(chunk_type(id=rid, created=created, model=req.model, choices=[], usage=self._usage(gen, finals)))
        return GenerationStream(events, gen, usage if req.include_usage_chunk else None)

    @staticmethod
    def _usage(gen: Generation, finals: dict[int, RequestOutput], generated: bool = True) -> Usage:
        prompt = sum(len(p) for p in gen.prompts)
        completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs) if generated else 0
        cached = sum(out.num_cached_tokens for out in finals.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def _token_text(self, token_id: int, as_id: bool) -> str:
        tok = self.engine.llm.tokenizer
        return f"token_id:{token_id}" if as_id or tok is None else tok.decode([token_id])

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, arrival: float) -> Response:
        req.check()
        self._check_model(req.model)
        tok = self._tokenizer
        messages = [_template_message(m) for m in req.messages]
        thinking = req.chat_template_kwargs.thinking if req.chat_template_kwargs else False
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.calls_tools else None

        def render() -> tuple[str, list[int]]:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking, tools=tools)
            return text, tok.encode(text)

        try:
            text, ids = await run_in_threadpool(render)
        except ConfigError as err:
            raise bad_request(str(err), "messages") from None
        opened = prompt_opens_reasoning(text)
        params = self._sampling(req, [ids], await self.chat_constraint(req))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = await self._start([ids], params, rid, arrival)
        created = int(time.time())
        if req.stream:
            finals: dict[int, RequestOutput] = {}
            return self._stream(gen, self._chat_stream(gen, req, rid, created, opened, finals), finals, req,
                                ChatCompletionChunk, rid, created)
        try:
            finals = await _collect(gen)
        finally:
            gen.close()
        out = finals[0]
        decision = None
        if self._dual_chain_applies(params.constraint) and not req.calls_tools:
            users = [m.text for m in req.messages if m.role == "user"]
            decision = await self._decide(out, users[-1] if users else None)
        choices = []
        as_ids = req.return_tokens_as_token_ids
        for c in out.outputs:
            parser = ReasoningParser(opened)
            reasoning, content = parser.parse(c.text or "")
            calls = []
            if req.calls_tools:
                content, calls = ToolCallParser().parse(content)
            if decision is not None and decision["chain"] == "rule":  # the rule chain's answer is the one used
                content = decision["answer"]
            message = ChatResponseMessage(
                content=content if content or not (parser.saw_reasoning or calls) else None,
                reasoning_content=reasoning if parser.saw_reasoning else None,
                tool_calls=[ResponseToolCall(id=call.id, function=ResponseFunctionCall(
                    name=call.name, arguments=call.arguments)) for call in calls] or None)
            asked = c.logprobs is not None and req.logprobs_k is not None  # the dual chain asks for them too
            logprobs = self._chat_logprobs(c.logprobs, as_ids) if asked else None
            choices.append(ChatChoice(index=c.index, message=message, finish_reason=_finish(c.finish_reason, calls),
                                      logprobs=logprobs))
        return json_response(ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                                            usage=self._usage(gen, finals), dual_chain=decision))

    async def chat_constraint(self, req: ChatCompletionRequest):
        """The grammar a chat request decodes under: a forced tool call (tool_choice required or naming a
        function), JSON (response_format json_object or json_schema), else none. Compiled off the event loop. A
        subclass may override it to add a constraint of its own (any object with the engine's constraint interface)."""
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_schema":
            return await self._compile(lambda: self.grammars.json_schema(fmt.json_schema.schema_), "response_format")
        if fmt is not None and fmt.type == "json_object":
            return await self._compile(self.grammars.json_object, "response_format")
        if req.forces_tool_call:
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            if isinstance(req.tool_choice, NamedToolChoice):
                tools = [t for t in tools if t["function"]["name"] == req.tool_choice.function.name]
            tag = forced_call_tag(tools, parallel=req.parallel_tool_calls and req.tool_choice == "required")
            return await self._compile(lambda: self.grammars.structural_tag(tag), "tools")
        return None

    async def _compile(self, make, param: str):
        try:
            return await run_in_threadpool(make)
        except ConfigError as err:
            raise bad_request(str(err), param) from None

    def _chat_logprobs(self, logprobs: list[Logprob], as_ids: bool) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self._token_text(token_id, as_ids)
            return TopLogprob(token=text, logprob=max(logprob, _MIN_LOGPROB), bytes=list(text.encode("utf-8")))

        content = []
        for lp in logprobs:
            chosen = top(lp.token_id, lp.logprob)
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[top(t, v) for t, v in lp.top.items()]))
        return ChatLogprobs(content=content)

    async def _chat_stream(self, gen: Generation, req: ChatCompletionRequest, rid: str, created: int,
                           opened: bool, finals: dict[int, RequestOutput]) -> AsyncIterator[str]:
        n = req.n

        def chunk(index: int, delta: ChatDelta, finish: str | None = None, logprobs=None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[ChatChunkChoice(
                index=index, delta=delta, finish_reason=finish, logprobs=logprobs)]))

        parsers = [ReasoningParser(opened) for _ in range(n)]
        tool_parsers = [ToolCallParser() for _ in range(n)]
        sent_logprobs = [0] * n
        finished = [False] * n
        for i in range(n):
            yield chunk(i, ChatDelta(role="assistant", content=""))
        async for _, out in gen:
            finals[0] = out
            for c in out.outputs:
                if finished[c.index]:
                    continue
                reasoning, content = parsers[c.index].feed(c.delta_text)
                if c.finish_reason is not None:
                    r2, c2 = parsers[c.index].finish()
                    reasoning, content = reasoning + r2, content + c2
                    finished[c.index] = True
                calls: list[CallDelta] = []
                if req.calls_tools:
                    tools = tool_parsers[c.index]
                    content, calls = tools.feed(content)
                    if c.finish_reason is not None:
                        c2, calls2 = tools.finish()
                        content, calls = content + c2, calls + calls2
                logprobs = None
                if req.logprobs_k is not None and c.logprobs is not None and len(c.logprobs) > sent_logprobs[c.index]:
                    logprobs = self._chat_logprobs(c.logprobs[sent_logprobs[c.index]:],
                                                   req.return_tokens_as_token_ids)
                    sent_logprobs[c.index] = len(c.logprobs)
                if reasoning or content or calls or logprobs or c.finish_reason:
                    delta = ChatDelta(reasoning_content=reasoning or None, content=content or None, tool_calls=[
                        DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                      function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
                        for d in calls] or None)
                    yield chunk(c.index, delta, _finish(c.finish_reason, tool_parsers[c.index].calls), logprobs)
        if finals and self._dual_chain_applies(gen.params.constraint) and not req.calls_tools:
            # the content streamed as the model wrote it; the decision follows in a chunk without choices
            users = [m.text for m in req.messages if m.role == "user"]
            decision = await self._decide(finals[0], users[-1] if users else None)
            yield sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], dual_chain=decision))

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, arrival: float) -> Response:
        req.check()
        self._check_model(req.model)
        texts = [p for p in req.prompts if isinstance(p, str)]
        tok = self._tokenizer if texts else None

        def encode() -> list[list[int]]:
            return [tok.encode_prompt(p) if isinstance(p, str) else list(p) for p in req.prompts]

        prompts = await run_in_threadpool(encode)
        params = self._sampling(req, prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = await self._start(prompts, params, rid, arrival)
        created = int(time.time())
        if req.stream:
            finals: dict[int, RequestOutput] = {}
            return self._stream(gen, self._completion_stream(gen, req, rid, created, finals), finals, req,
                                Completion, rid, created)
        try:
            finals = await _collect(gen)
        finally:
            gen.close()
        as_ids = req.return_tokens_as_token_ids
        generated = req.max_tokens != 0
        # one decision a prompt, in the order of the prompts (the text of the choices is the model's)
        decisions = ([await self._decide(finals[tag], None) for tag in sorted(finals)]
                     if generated and self._dual_chain_applies() else None)
        choices = []
        for tag in sorted(finals):
            out = finals[tag]
            echoed = self._echo(req.prompts[tag], out) if req.echo else ("", [])
            for c in out.outputs:
                entries = echoed[1] + ([(lp.token_id, lp) for lp in c.logprobs or []] if generated else [])
                asked = c.logprobs is not None and req.logprobs_k is not None  # the dual chain asks for them too
                choices.append(CompletionChoice(
                    index=tag * req.n + c.index, text=echoed[0] + (c.text or "" if generated else ""),
                    finish_reason=c.finish_reason if generated else "length",
                    logprobs=self._completion_logprobs(entries, 0, as_ids) if asked else None))
        return json_response(Completion(id=rid, created=created, model=req.model, choices=choices,
                                        usage=self._usage(gen, finals, generated),
                                        dual_chain={"prompts": decisions} if decisions is not None else None))

    def _echo(self, prompt: str | list[int], out: RequestOutput) -> tuple[str, list[tuple[int, Logprob | None]]]:
        """An echoed prompt: its text (as sent, or decoded from ids) and its tokens with their logprobs."""
        tok = self.engine.llm.tokenizer
        text = prompt if isinstance(prompt, str) else tok.decode(prompt) if tok is not None else ""
        logprobs = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return text, list(zip(out.prompt_token_ids, logprobs))

    def _completion_logprobs(self, entries: list[tuple[int, Logprob | None]], offset: int,
                             as_ids: bool) -> CompletionLogprobs:
        """Logprobs of (token, Logprob) entries; a None Logprob (an echoed prompt's first token) has none."""
        tokens, offsets = [], []
        for token_id, _ in entries:
            tokens.append(self._token_text(token_id, as_ids))
            offsets.append(offset)
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[None if lp is None else max(lp.logprob, _MIN_LOGPROB) for _, lp in entries],
            top_logprobs=[None if lp is None else {self._token_text(t, as_ids): max(v, _MIN_LOGPROB)
                                                   for t, v in lp.top.items()} for _, lp in entries],
            text_offset=offsets)

    async def _completion_stream(self, gen: Generation, req: CompletionRequest, rid: str, created: int,
                                 finals: dict[int, RequestOutput]) -> AsyncIterator[str]:
        n = req.n
        sent_logprobs: dict[int, int] = {}
        offsets: dict[int, int] = {}
        finished: set[int] = set()
        async for tag, out in gen:
            finals[tag] = out
            for c in out.outputs:
                index = tag * n + c.index
                if index in finished:
                    continue
                logprobs = None
                sent = sent_logprobs.get(index, 0)
                if req.logprobs_k is not None and c.logprobs is not None and len(c.logprobs) > sent:
                    logprobs = self._completion_logprobs([(lp.token_id, lp) for lp in c.logprobs[sent:]],
                                                         offsets.get(index, 0),
                                                         req.return_tokens_as_token_ids)
                    sent_logprobs[index] = len(c.logprobs)
                    offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                if c.finish_reason is not None:
                    finished.add(index)
                if c.delta_text or logprobs or c.finish_reason:
                    yield sse(Completion(id=rid, created=created, model=req.model, choices=[CompletionChoice(
                        index=index, text=c.delta_text, logprobs=logprobs, finish_reason=c.finish_reason)]))
        if finals and req.max_tokens != 0 and self._dual_chain_applies():
            decisions = [await self._decide(finals[tag], None) for tag in sorted(finals)]
            yield sse(Completion(id=rid, created=created, model=req.model, choices=[],
                                 dual_chain={"prompts": decisions}))


def _template_message(m) -> dict:
    """A request message as the chat template reads it (OpenAI's field names; content None on a turn that
    only calls tools)."""
    out = {"role": "system" if m.role == "developer" else m.role,
           "content": None if m.role == "assistant" and m.content is None and m.tool_calls else m.text}
    if m.role == "assistant" and m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def _finish(reason: str | None, calls: list) -> str | None:
    """OpenAI's finish reason: an answer that ended by itself after calling tools ends with "tool_calls"."""
    return "tool_calls" if reason == "stop" and calls else reason


async def _collect(gen: Generation) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for tag, out in gen:
            finals[tag] = out
    except EngineFailure as err:
        raise engine_error(err) from None
    return finals


def _error_event(err: APIError) -> str:
    return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"


class GenerationStream(StreamingResponse):
    """Server-sent events of one generation: its content `events`, then the usage chunk (`usage()`, when
    asked for) and [DONE]; an engine failure ends the stream with an error event. However the response ends
    (done, client gone, never started), what is left of the generation is aborted."""

    def __init__(self, events: AsyncIterator[str], gen: Generation, usage: Callable[[], str] | None):
        super().__init__(self._with_tail(events, usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = gen

    async def _with_tail(self, events: AsyncIterator[str], usage: Callable[[], str] | None) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
            if usage is not None:
                yield usage()
            yield "data: [DONE]\n\n"
        except EngineFailure as err:
            yield _error_event(engine_error(err))
        finally:
            self.generation.close()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()

