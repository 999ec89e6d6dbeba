"""The wire format: OpenAI request and response models, and the OpenAI error envelope.

Requests are validated strictly (a string is not a number, a float is not an integer, NaN is not a
number) so that a wrong type is a 400 naming the field rather than a silent coercion. Unknown fields
are ignored, as vLLM does, so clients that send newer OpenAI fields keep working; OpenAI fields whose
meaning we cannot honour (the legacy functions, logit_bias, suffix) accept only their neutral value,
in the schema too, and anything else is a 400 saying so (see UNSUPPORTED). Combinations that cannot be
served are checked in `check()` methods, still as 400s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_serializer

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs; also the completions API's logprobs limit here
MAX_N = 128  # OpenAI's limit for n
# OpenAI fields this server cannot honour -> what they are for (the 400 names it)
UNSUPPORTED = {"functions": "the legacy function calling: send tools", "function_call": "the legacy function calling: "
               "send tool_choice", "logit_bias": "logit bias", "suffix": "fill-in-the-middle"}


class APIError(Exception):
    """An error answered with the OpenAI envelope {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------------------ requests

class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer, so do we; 2.5, "2" and true stay errors."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[Int, Field(ge=0)]
Nothing = Annotated[list[Any], Field(max_length=0)]  # the neutral value of a list field we cannot honour


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchema(_Request):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JSONSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchema


# structured output: json_object and json_schema constrain decoding so that the answer parses (and validates)
ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # the arguments as a JSON text, as the model wrote them


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Request):
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # earlier answers; their reasoning is dropped by the template
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]  # a tool's result, for the template to render
    tool_call_id: str


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(_Request):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateKwargs(_Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    thinking: bool = False  # open the answer with <think> (DeepSeek's template switch)


class _SamplingFields(_Request):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extras)."""

    model: str
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stop: NonEmpty | list[NonEmpty] | None = None
    seed: Int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    # vLLM extras
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:123" (exact where text is not)
    # seekforge extension: the fewest routed experts a token may run with when the server's adaptive expert
    # activation (--adaptive-experts) lowers them under load; the model's k or more opts the request out
    min_experts: Int | None = Field(default=None, ge=1)

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def sampling_kwargs(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        kwargs = dict(n=self.n, stop=stop, stop_token_ids=list(self.stop_token_ids or []), seed=self.seed,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                      min_experts=self.min_experts)
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    functions: Nothing | None = None
    function_call: Literal["none"] | None = None
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        super().check()
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise bad_request("tool_choice requires a tool: send tools, or leave tool_choice out", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise bad_request(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                              f"among the tools ({', '.join(names)})", "tool_choice")
        if len(set(names)) < len(names):
            raise bad_request("two tools have the same function name: give each its own", "tools")
        if self.forces_tool_call and self.response_format is not None and self.response_format.type != "text":
            raise bad_request("a forced tool call (tool_choice required or a named function) and a JSON "
                              "response_format cannot both shape the answer: give one of them", "response_format")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise bad_request(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                              f"({self.max_completion_tokens}) disagree: give one of them", "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def calls_tools(self) -> bool:
        """Whether the model may call the tools (and its output is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"


Prompt = NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | \
    Annotated[list[TokenId], Field(min_length=1)] | \
    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Int | None = Field(default=16, ge=0)  # 0 (with echo): score the prompt, generate nothing
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt opens each choice's text (and its logprobs, with the prompt tokens')
    suffix: Annotated[str, Field(max_length=0)] | None = None
    best_of: Int | None = Field(default=None, ge=1)

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of ({self.best_of}) different from n ({self.n}) is not supported", "best_of")
        if self.echo and self.stream:
            raise bad_request("echo is not supported with stream: send stream false", "echo")
        if self.max_tokens == 0 and self.stream:
            raise bad_request("max_tokens 0 generates nothing to stream: send stream false", "max_tokens")

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


# ------------------------------------------------------------------------------------------ responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int  # which call of the message; its first delta carries id, type and name
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class _DualChainExtension(BaseModel):
    """seekforge's extension field of a response under `seekforge serve --dual-chain`: which chain answered
    (generative or rule), the answer, the model's confidence and the rule chain's derivation. Left out of the
    JSON where the server runs without it; OpenAI's client keeps unknown fields aside (`model_extra`)."""

    dual_chain: dict | None = None

    @model_serializer(mode="wrap")
    def _leave_out_when_unset(self, handler):
        data = handler(self)
        if data.get("dual_chain") is None:
            data.pop("dual_chain", None)
        return data


class ChatCompletion(_DualChainExtension):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_DualChainExtension):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_DualChainExtension):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # null on streamed chunks unless usage is asked for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seekforge"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
