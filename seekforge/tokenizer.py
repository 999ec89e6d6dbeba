"""A byte-level BPE tokenizer with DeepSeek's special tokens and chat template, over HF `tokenizers`.

The files it writes (tokenizer.json + tokenizer_config.json) are the Hugging Face layout, so
`transformers.AutoTokenizer` loads them, encodes text and renders chats exactly as this class does;
`from_pretrained` loads any such directory, DeepSeek's own included, with the checkpoint's own chat
template (seekforge's built-in DeepSeek template only where it has none) and its own rule for special
tokens around a text prompt (the post-processor of its tokenizer.json, which is what transformers 5 follows).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from seekforge.chat_template import compile_template, render
from seekforge.configio import atomic_write_text
from seekforge.errors import ConfigError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)
# Reasoning markers are added tokens (one id each) but ordinary text: skip_special_tokens keeps them,
# because the R1 rewards read them from decoded completions.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_ADDED = re.compile("|".join(map(re.escape, SPECIAL_TOKENS + REASONING_TOKENS)))

# Conventions of other tokenizer families, tried in order when a config does not name the token.
_BOS_FALLBACKS = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>")
_EOS_FALLBACKS = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>")
# The other special tokens a tokenizer_config.json may name; chat templates see them as variables.
_OTHER_SPECIAL = ("unk_token", "sep_token", "cls_token", "mask_token")

# DeepSeek-V3's tool-call markers (added tokens in its vocabulary; plain text in seekforge's own tokenizers)
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

# seekforge's built-in chat template, DeepSeek's format, for checkpoints that bring none. System messages
# come first (joined by a blank line), after BOS. Assistant turns before the last user message lose their
# reasoning, as in DeepSeek-R1's template; turns after it keep it, so training data rendered with
# add_generation_prompt=False still teaches the model to reason.
# Tools follow DeepSeek-V3: an assistant turn's calls are written in its tool-call format, a run of tool
# results goes between <｜tool▁outputs▁begin｜> and <｜tool▁outputs▁end｜>, and the answer after them follows
# without a new assistant tag. V3's own template leaves describing the tools to the system prompt; this one
# appends the tools (name, description, parameters as JSON) and the call format to it.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', last_user=-1, in_tools=false) -%}"
    "{%- for m in messages -%}"
    "{%- if not (m['content'] is string or (m['role'] == 'assistant' and m['tool_calls'] is defined"
    " and (m['content'] is not defined or m['content'] is none))) -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' (' ~ m['role'] ~ ') has no string content: '"
    " ~ 'content must be a string') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- elif m['role'] not in ('assistant', 'tool') -%}"
    "{{- raise_exception('unsupported chat role ' ~ m['role'] ~ ': use system, user, assistant or tool') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + '## Tools\\nYou have access to the "
    "following tools:\\n' -%}"
    "{%- for t in tools -%}{%- set f = t['function'] if t['function'] is defined else t -%}"
    "{%- set ns.system = ns.system + '\\n### ' + f['name'] + '\\nDescription: ' + (f['description'] or '')"
    " + '\\n\\nParameters: ' + (f['parameters'] | tojson) + '\\n' -%}"
    "{%- endfor -%}"
    "{%- set ns.system = ns.system + '\\nTo call tools, answer in this format:\\n" + TOOL_CALLS_BEGIN
    + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "NAME\\n```json\\nARGUMENTS\\n```" + TOOL_CALL_END
    + "\\n(more calls the same way, one a line)" + TOOL_CALLS_END + "' -%}"
    "{%- endif -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'tool' -%}"
    "{{- ('\\n' if ns.in_tools else '" + TOOL_OUTPUTS_BEGIN + "') + '" + TOOL_OUTPUT_BEGIN + "' + m['content'] + '"
    + TOOL_OUTPUT_END + "' -}}"
    "{%- set ns.in_tools = true -%}"
    "{%- elif m['role'] != 'system' -%}"
    "{%- if ns.in_tools -%}{{- '" + TOOL_OUTPUTS_END + "' -}}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '" + USER + "' + m['content'] -}}"
    "{%- else -%}"
    "{%- set content = m['content'] if m['content'] is string else '' -%}"
    "{%- if loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- ('' if ns.in_tools else '" + ASSISTANT + "') + content -}}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{{- '" + TOOL_CALLS_BEGIN + "' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{%- set args = c['function']['arguments'] -%}"
    "{{- ('' if loop.first else '\\n') + '" + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "' + c['function']['name']"
    " + '\\n```json\\n' + (args if args is string else args | tojson) + '\\n```" + TOOL_CALL_END + "' -}}"
    "{%- endfor -%}"
    "{{- '" + TOOL_CALLS_END + "' -}}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endif -%}"
    "{%- set ns.in_tools = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_tools -%}{{- '" + TOOL_OUTPUTS_END + "' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '' if ns.in_tools else '" + ASSISTANT + "' -}}"
    "{%- if thinking is defined and thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the special tokens and chat template seekforge needs."""

    def __init__(self, hf: HFTokenizer, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int = 4096, special_tokens: dict[str, str] | None = None):
        self.hf = hf
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.chat_template = chat_template or CHAT_TEMPLATE
        self.model_max_length = model_max_length
        self.special_tokens = dict(special_tokens or {})  # unk/sep/cls/mask tokens the config names
        self.bos_id = self._required_id(bos_token, "bos_token")
        self.eos_id = self._required_id(eos_token, "eos_token")
        self.pad_id = self._required_id(self.pad_token, "pad_token")

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str) -> None:
        compile_template(source)  # a template that does not compile fails here, not at the first chat
        self._chat_template = source

    def _required_id(self, token: str, role: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise ConfigError(f"{role} {token!r} is not in the tokenizer's vocabulary: "
                              f"set {role} in tokenizer_config.json to a token the vocabulary holds")
        return tid

    # ---- training --------------------------------------------------------------------------------

    @classmethod
    def train(cls, files_or_texts: Iterable[str | os.PathLike], vocab_size: int, *,
              min_frequency: int = 2, model_max_length: int = 4096, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` ids, special and reasoning tokens included (fewer when
        the texts offer fewer merges than that).

        Items that are `os.PathLike` (e.g. `pathlib.Path`) are files, read document by document as
        `seekforge.documents` reads them (.txt, .jsonl, .parquet); plain `str` items are texts.
        Digits are split one per token so that arithmetic stays learnable.
        """
        n_added = len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
        floor = len(pre_tokenizers.ByteLevel.alphabet()) + n_added
        if vocab_size < floor:
            raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                              f"{floor} ids (256 bytes + {n_added} special tokens); pass --vocab-size >= {floor}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(REASONING_TOKENS),  # they are appended after training
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        seen = [0]
        hf.train_from_iterator(_batches(_texts(files_or_texts), seen), trainer=trainer)
        if seen[0] == 0:
            raise ConfigError("no text to train the tokenizer on: pass at least one non-empty file or text")
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
        # A text prompt starts with BOS, as DeepSeek's tokenizer.json has it: transformers then encodes a
        # text as the engine does, and the saved config says add_bos_token for older transformers.
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, hf.token_to_id(BOS))])
        return cls(hf, model_max_length=model_max_length)

    # ---- encoding --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self.hf.id_to_token(tid)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of `text`. With add_special_tokens, the tokens the tokenizer.json's post-processor adds
        around a text (BOS for DeepSeek's and seekforge's), as transformers' `tokenizer(text)` adds them."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt as the model is fed it: what transformers' `AutoTokenizer(dir)(text).input_ids` gives,
        except that a text already opening with BOS (a rendered chat, say) gets no second one."""
        return self.encode(text, add_special_tokens=not text.startswith(self.bos_token))

    @property
    def add_bos_token(self) -> bool:
        """Whether a text prompt gets BOS in front (the post-processor's rule)."""
        return self.encode("", add_special_tokens=True)[:1] == [self.bos_id]

    @property
    def add_eos_token(self) -> bool:
        """Whether a text prompt gets EOS after it (the post-processor's rule; rare)."""
        return self.encode("", add_special_tokens=True)[-1:] == [self.eos_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges and special tokens: equal fingerprints tokenize alike."""
        blob = self.hf.to_str() + json.dumps([self.bos_token, self.eos_token, self.pad_token])
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    # ---- chat ------------------------------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens a chat template sees as variables (bos_token, eos_token, ...)."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                **self.special_tokens}

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            thinking: bool = False, tools: Sequence[dict] | None = None) -> str:
        """The conversation as text, rendered by the checkpoint's chat template. `thinking` is passed (only when
        true, as transformers passes a keyword given) for DeepSeek's templates, which then open the answer
        with <think>; templates that do not read it are unaffected. `tools` (OpenAI tool dicts) reach the
        template as its `tools` variable."""
        return render(self.chat_template, messages, add_generation_prompt, tools=tools, **self.special_tokens_map,
                      **({"thinking": True} if thinking else {}))

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    thinking: bool = False) -> list[int]:
        # No special tokens: templates write BOS themselves, as transformers' apply_chat_template assumes.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, thinking))

    # ---- files -----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            **self.special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        atomic_write_text(directory / "tokenizer.json", self.hf.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        # A chat_template.jinja left from an earlier save would take precedence over the template just written.
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json, optional tokenizer_config.json)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: point at a directory holding tokenizer.json "
                              "(write one with `seekforge tokenizer train` or download a model's tokenizer)")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise ConfigError(f"{path} is not a valid tokenizer.json ({err}): re-save or re-download it") from err
        config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"{config_path} is not valid JSON ({err}): fix or delete it") from err
        bos = _token_content(config.get("bos_token")) or _first_known(hf, _BOS_FALLBACKS)
        eos = _token_content(config.get("eos_token")) or _first_known(hf, _EOS_FALLBACKS)
        if bos is None or eos is None:
            raise ConfigError(f"cannot tell the {'bos' if bos is None else 'eos'} token of {directory}: "
                              "set bos_token and eos_token in its tokenizer_config.json")
        kwargs = {}
        max_len = config.get("model_max_length")
        if isinstance(max_len, int) and max_len < 10**9:  # transformers writes 1e30 for "no limit"
            kwargs["model_max_length"] = max_len
        special = {k: v for k in _OTHER_SPECIAL if (v := _token_content(config.get(k)))}
        return cls(hf, bos_token=bos, eos_token=eos, pad_token=_token_content(config.get("pad_token")),
                   chat_template=_chat_template(directory, config), special_tokens=special, **kwargs)


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_known(hf: HFTokenizer, candidates: Sequence[str]) -> str | None:
    return next((t for t in candidates if hf.token_to_id(t) is not None), None)


def _chat_template(directory: Path, config: dict) -> str | None:
    """The checkpoint's chat template, found where transformers looks: template files first (chat_template.jinja,
    additional_chat_templates/NAME.jinja), then tokenizer_config.json's entry (a string, or a list of
    {"name", "template"}); of named templates, the one named "default"."""
    files = {}
    if (directory / "chat_template.jinja").is_file():
        files["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        files.update({f.name.removesuffix(".jinja"): f.read_text(encoding="utf-8") for f in extra.glob("*.jinja")})
    template = files or config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        if "default" not in template:
            raise ConfigError(f"{directory} has chat templates named {sorted(map(str, template))} but none named "
                              f"'default', the one chats use: name one of them default")
        template = template["default"]
    return template if isinstance(template, str) and template else None


def _texts(files_or_texts: Iterable[str | os.PathLike]) -> Iterator[str]:
    for item in files_or_texts:
        if isinstance(item, os.PathLike):
            from seekforge.documents import iter_documents, text_of

            yield from map(text_of, iter_documents(Path(item), lambda msgs: render(CHAT_TEMPLATE, msgs, False,
                                                                                   bos_token=BOS, eos_token=EOS)))
        elif isinstance(item, str):
            yield item
        else:
            raise ConfigError(f"cannot train on a {type(item).__name__}: pass texts (str) or files (pathlib.Path)")


def _batches(texts: Iterator[str], seen: list[int], size: int = 1000) -> Iterator[list[str]]:
    """Batches of training text, cut at special and reasoning tokens: encoding matches those before
    BPE runs, so their spelling must not spend merges."""
    batch = []
    for text in texts:
        pieces = [p for p in _ADDED.split(text) if p]
        seen[0] += bool(pieces)
        for piece in pieces:
            batch.append(piece)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch
