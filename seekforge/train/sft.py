"""Supervised fine-tuning (cold-start SFT, and the student side of distillation).

    seekforge sft --from runs/base/final --data traces.jsonl --out runs/sft [key=value ...]

Rows of the .jsonl file, one of:
- {"prompt": str, "completion": str}: the prompt (encoded as the engine encodes it: BOS first where the
  tokenizer adds BOS to a text, as DeepSeek's and seekforge's do) then the completion and EOS; the loss
  covers the completion and EOS.
- {"messages": [{"role": ..., "content": ...}, ...]}: a chat rendered with the tokenizer's chat template;
  the loss covers every assistant turn (the tokens after each assistant marker, through its EOS).
Other keys (task, answer, rewards: what `seekforge sample` writes) are ignored.

Packing (default): whole examples are laid end to end into rows of seq_len + 1 tokens, first fit in a
shuffled order, the rest of a row padded; no example is cut unless it alone is longer than a row. Packed
examples stay mutually invisible (DeepSeek-V3's sample masking): each attends only to itself, its rotary
positions start at 0, and no label or MTP target reaches into the next, so a packed row trains exactly as
its examples would one by one.
Without packing a batch holds one example per row, padded to its longest. The trainer is pretraining's
(seekforge.train.lm on the training loop: the same checkpoints, exact resume, metrics, report,
auxiliary-loss-free balancing of a MoE student); SFT supplies the data and, with a teacher, a loss term. Logit distillation
(kd_weight > 0) adds the KL divergence from the teacher's next-token distribution to the student's, at
temperature kd_temperature, on the trained tokens:
loss = (1 - kd_weight) * cross-entropy (+ MTP, balance) + kd_weight * T^2 * KL(p_teacher^T || p_student^T).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from seekforge.configio import load_config
from seekforge.documents import jsonl_objects
from seekforge.errors import ConfigError, DataError
from seekforge.model.transformer import ModelLoss
from seekforge.train.lm import IGNORE, LMConfig, LMTrainer


@dataclass
class SFTConfig(LMConfig):
    """LMConfig's settings (model: the shape when training from scratch, a student; init_from takes precedence),
    with fine-tuning's defaults where they differ from pretraining's, and SFT's own."""

    NAME: ClassVar[str] = "sft"
    data: str = ""  # the .jsonl file
    # fine-tuning's defaults
    seq_len: int = 512
    steps: int = 200
    lr: float = 1e-4
    warmup_steps: int = 10
    constant_steps: int = 90
    decay_steps: int = 100
    final_lr: float = 1e-5
    mtp_weight: float = 0.1
    eval_every: int = 50
    # SFT's own
    packing: bool = True
    completion_only_loss: bool = True  # False: every token is a target (prompt and chat markers too)
    val_fraction: float = 0.02  # examples held out for the eval loss
    teacher: str | None = None  # checkpoint for logit distillation (same tokenizer)
    kd_weight: float = 0.0
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"sft config: kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_weight and not self.teacher:
            raise ConfigError("sft config: kd_weight > 0 needs teacher=CHECKPOINT (logit distillation)")
        if self.kd_temperature <= 0 or not 0 <= self.val_fraction < 1:
            raise ConfigError("sft config: kd_temperature must be > 0 and val_fraction in [0, 1)")


def load_sft_config(name_or_path: str | None, overrides: list[str] = ()) -> SFTConfig:
    return load_config(SFTConfig, name_or_path or "default", {"default": {}}, list(overrides))


# ---------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    ids: list[int]
    target: list[bool]  # target[t]: token t is predicted in the loss


def tokenize_row(row: dict, tokenizer, completion_only: bool = True, where: str = "row") -> Example:
    """One .jsonl row as token ids and the mask of trained tokens (see the module doc)."""
    if isinstance(row.get("messages"), list):
        from seekforge.tokenizer import ASSISTANT

        ids = tokenizer.encode_chat(row["messages"], add_generation_prompt=False)
        marker = tokenizer.token_to_id(ASSISTANT)
        if marker is None:
            raise ConfigError(f"{where}: the tokenizer has no {ASSISTANT} token, so assistant turns cannot be "
                              f"found; write prompt/completion rows instead")
        if marker not in ids and any(m["role"] == "assistant" for m in row["messages"]):
            raise ConfigError(f"{where}: the tokenizer's chat template writes no {ASSISTANT} marker (it is not "
                              f"DeepSeek's format, e.g. R1-Zero's), so assistant turns cannot be found; write "
                              f"prompt/completion rows instead")
        target, inside = [], False
        for tid in ids:
            target.append(inside or not completion_only)
            if tid == marker:
                inside = True
            elif tid == tokenizer.eos_id:
                inside = False
        if not any(target):
            raise DataError(f"{where}: no assistant turn to learn from")
        return Example(ids, target)
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: expected {{\"prompt\": str, \"completion\": str}} or {{\"messages\": [...]}}, "
                        f"got keys {sorted(row)}")
    p = tokenizer.encode_prompt(prompt)
    c = tokenizer.encode(completion) + [tokenizer.eos_id]
    return Example(p + c, [not completion_only] * len(p) + [True] * len(c))


def read_examples(path: str | os.PathLike, tokenizer, completion_only: bool = True) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: pass --data FILE.jsonl (e.g. what `seekforge sample` writes)")
    examples = [tokenize_row(row, tokenizer, completion_only, where=where)
                for where, row in jsonl_objects(path, '{"prompt": "...", "completion": "..."}')]
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def pack(lengths: list[int], order: list[int], width: int) -> list[list[int]]:
    """First-fit packing of examples (by index, in `order`) into rows of `width` tokens; an example
    longer than a row gets a row of its own (and is cut there)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], width)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def collate(examples: list[Example], rows: list[list[int]], width: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of example indices -> input_ids, labels and positions, each [b, L]; L = width - 1, or the longest
    row's length - 1 when width is None. labels[t] is token t + 1 where that token is trained and belongs to
    token t's example, else IGNORE: no label crosses from one packed example into the next. positions restart
    at 0 with each example (and with the padding after them), so each is rotated exactly as if it were alone;
    `document_mask` turns them into the attention mask that keeps the examples apart."""
    seqs = []
    for row in rows:
        ids, target, pos = [], [], []
        for i in row:
            ids += examples[i].ids
            target += [False] + examples[i].target[1:]  # an example's first token is no one's label
            pos += range(len(examples[i].ids))
        seqs.append((ids[:width], target[:width], pos[:width]) if width else (ids, target, pos))
    L = width or max(len(ids) for ids, _, _ in seqs)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    positions = torch.arange(L).repeat(len(rows), 1)
    for r, (ids, target, pos) in enumerate(seqs):
        t = torch.tensor(ids)
        tokens[r, :len(ids)] = t
        keep = torch.tensor(target[1:], dtype=torch.bool)
        labels[r, :len(ids) - 1] = torch.where(keep, t[1:], torch.full_like(t[1:], IGNORE))
        positions[r, :len(ids)] = torch.tensor(pos)
        positions[r, len(ids):] -= len(ids)  # the padding: a segment of its own
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels[:, :-1].contiguous(),
            "positions": positions[:, :-1].contiguous()}


class SFTLoader:
    """Endless shuffled batches of SFT examples (packed or one per row), exactly resumable."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 packing: bool = True):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.pad_id, self.seed, self.packing = pad_id, seed, packing
        self.lengths = [len(e.ids) for e in examples]
        self.epoch, self.index = 0, 0
        self._rows_epoch, self._rows = -1, []

    def rows_of(self, epoch: int) -> list[list[int]]:
        if epoch != self._rows_epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
            self._rows = pack(self.lengths, order, self.seq_len + 1) if self.packing else [[i] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            rows = self.rows_of(self.epoch)
            take = rows[self.index:self.index + self.batch_size - len(picked)]
            picked += take
            self.index += len(take)
            if self.index >= len(rows):
                self.epoch, self.index = self.epoch + 1, 0
        width = self.seq_len + 1 if self.packing else min(self.seq_len + 1, max(self.lengths[r[0]] for r in picked))
        return collate(self.examples, picked, width, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "examples": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("examples") != len(self.examples) or state.get("seed") != self.seed:
            raise ConfigError(f"cannot resume the SFT data position: the run had {state.get('examples')} examples "
                              f"(seed {state.get('seed')}), now {len(self.examples)} (seed {self.seed}); resume "
                              f"with the same --data file and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return temperature**2 * (kl * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- the trainer
class SFTData:
    """SFT's data (LMData): the .jsonl examples, split into training and held-out ones."""

    def __init__(self, cfg: SFTConfig):
        from seekforge.tokenizer import Tokenizer

        if not cfg.data:
            raise ConfigError("sft: pass the training examples with --data FILE.jsonl")
        candidates = [cfg.tokenizer, cfg.init_from, cfg.teacher]
        self.tokenizer_dir = next((Path(c) for c in candidates if c and (Path(c) / "tokenizer.json").is_file()), None)
        if self.tokenizer_dir is None:
            raise ConfigError("sft: no tokenizer: start from a checkpoint holding tokenizer.json (--from), or set "
                              "tokenizer=DIR")
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        self.vocab_size = self.tokenizer.vocab_size
        examples = read_examples(cfg.data, self.tokenizer, cfg.completion_only_loss)
        order = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(examples)).tolist()
        n_val = int(len(examples) * cfg.val_fraction)
        self.val_examples = [examples[i] for i in order[:n_val]]
        self.train_examples = [examples[i] for i in order[n_val:]] or examples

    def batches(self) -> SFTLoader:
        cfg = self.cfg
        return SFTLoader(self.train_examples, cfg.seq_len, cfg.batch_size, self.tokenizer.pad_id, cfg.seed,
                         cfg.packing)

    def eval_batches(self):
        cfg = self.cfg
        lengths = [len(e.ids) for e in self.val_examples]
        order = list(range(len(self.val_examples)))
        rows = pack(lengths, order, cfg.seq_len + 1) if cfg.packing else [[i] for i in order]
        for lo in range(0, min(len(rows), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
            yield collate(self.val_examples, rows[lo:lo + cfg.batch_size], cfg.seq_len + 1 if cfg.packing else None,
                          self.tokenizer.pad_id)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss}


class LogitDistillation:
    """The loss term of logit distillation (an Objective): loss = (1 - kd_weight) * loss + kd_weight * the KL
    from the teacher's next-token distribution to the student's on the trained tokens (`distillation_kl`)."""

    def __init__(self, trainer: LMTrainer):
        from seekforge.model.hf import from_pretrained

        cfg = trainer.cfg
        self.weight, self.temperature = cfg.kd_weight, cfg.kd_temperature
        self.teacher = from_pretrained(cfg.teacher, dtype=torch.float32, device=trainer.device).eval()
        self.teacher.requires_grad_(False)
        if self.teacher.cfg.vocab_size != trainer.model_cfg.vocab_size:
            raise ConfigError(f"logit distillation needs one vocabulary: the teacher has "
                              f"{self.teacher.cfg.vocab_size} ids, the student {trainer.model_cfg.vocab_size}")

    def __call__(self, out: ModelLoss, batch: dict[str, torch.Tensor], attention: dict[str, torch.Tensor]) -> ModelLoss:
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"], **attention)
        kd = distillation_kl(out.logits, teacher_logits, batch["labels"] != IGNORE, self.temperature)
        out.loss = (1 - self.weight) * out.loss + self.weight * kd
        return out


def build_trainer(cfg: SFTConfig, out_dir: str | Path, resume: bool = False) -> LMTrainer:
    """An SFT run in `out_dir`, built and (with `resume`) restored, ready to train()."""
    return LMTrainer(cfg, out_dir, lambda out: SFTData(cfg), resume=resume,
                     objective=LogitDistillation if cfg.kd_weight else None)


def run(cfg: SFTConfig, out_dir: str | Path, resume: bool = False, report: bool = True) -> dict:
    return build_trainer(cfg, out_dir, resume).run(report)
