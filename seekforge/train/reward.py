"""Reward-model training on pairwise preferences (Bradley-Terry), on the language model's trainer.

    seekforge rm train --init-from runs/sft/final --data pairs.jsonl --out runs/rm [key=value ...]
    seekforge rm eval runs/rm/final --data held_out.jsonl

Rows of the .jsonl file: {"prompt", "chosen", "rejected"}. The prompt is a text (encoded as the engine encodes
a prompt: BOS first where the tokenizer adds it) followed by the response's text, or chat-shaped: a list of
messages (and the responses texts, or lists of assistant messages), rendered by the checkpoint's chat template
with the responses as the assistant's turns. A sequence longer than seq_len keeps its last seq_len tokens (the
reward is read at the end). Other keys are ignored.

The model is seekforge.model.reward's: the checkpoint's backbone (init_from; or a fresh model of `model`) with
a scalar head read at the last token that is not padding. The loss is Bradley-Terry's:
mean over pairs of -log sigmoid(r_chosen - r_rejected) (plus the sequence-wise balance loss of a MoE backbone).
The trainer is the language model's (seekforge.train.lm on the training loop: checkpoints, exact resume,
metrics, report, auxiliary-loss-free balancing); this module supplies the data, the model, the loss and the
held-out metrics (eval_accuracy: the share of held-out pairs whose chosen response scores higher; eval_loss;
eval_margin: the mean r_chosen - r_rejected). One process: no torchrun.
DIR/final holds the reward model in transformers' sequence-classification layout with the tokenizer.
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
from seekforge.model.transformer import ModelLoss, sequence_balance_loss
from seekforge.train.lm import LMConfig, LMTrainer


@dataclass
class RMConfig(LMConfig):
    """LMConfig's settings (model: the shape when training from scratch; init_from, a checkpoint, takes
    precedence), with reward-model training's defaults where they differ from pretraining's, and its own."""

    NAME: ClassVar[str] = "rm"
    data: str = ""  # the .jsonl file of preference pairs
    # fine-tuning's defaults; batch_size counts pairs
    seq_len: int = 512
    batch_size: int = 16
    steps: int = 200
    lr: float = 5e-5
    warmup_steps: int = 10
    constant_steps: int = 90
    decay_steps: int = 100
    final_lr: float = 5e-6
    mtp_weight: float = 0.0
    eval_every: int = 50
    # the reward model's own
    val_fraction: float = 0.1  # pairs held out for eval_accuracy

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"rm config: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.fp8 != "none" or self.compile:
            raise ConfigError("rm config: fp8 and compile are not wired for the reward model; set fp8=none "
                              "compile=false")


def load_rm_config(name_or_path: str | None, overrides: list[str] = ()) -> RMConfig:
    return load_config(RMConfig, name_or_path or "default", {"default": {}}, list(overrides))


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the preferences
    under the Bradley-Terry model P(chosen > rejected) = sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


# ---------------------------------------------------------------------------------------------- data
def encode_response(tokenizer, prompt, response) -> list[int]:
    """The ids the reward model scores for `response` to `prompt` (see the module doc): a text prompt then the
    response's text, or a chat (prompt and/or response lists of messages) rendered by the chat template."""
    if isinstance(prompt, str) and isinstance(response, str):
        return tokenizer.encode_prompt(prompt) + tokenizer.encode(response)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages += [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return tokenizer.encode_chat(messages, add_generation_prompt=False)


def _is_side(value, chat_ok: bool = True) -> bool:
    return isinstance(value, str) or (chat_ok and isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value))


def read_pairs(path: str | os.PathLike, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of every row of the .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: pass --data FILE.jsonl with rows {{\"prompt\", \"chosen\", \"rejected\"}}")
    pairs = []
    for where, row in jsonl_objects(path, '{"prompt": "...", "chosen": "...", "rejected": "..."}'):
        if not all(_is_side(row.get(k)) for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{where}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, each a text or a list of "
                            f"{{\"role\", \"content\"}} messages; got {sorted(row)}")
        pairs.append((encode_response(tokenizer, row["prompt"], row["chosen"]),
                      encode_response(tokenizer, row["prompt"], row["rejected"])))
    if not pairs:
        raise DataError(f"{path} holds no preference pairs")
    return pairs


def collate_sequences(sequences: list[list[int]], max_len: int, pad_id: int) -> torch.Tensor:
    """Right-padded ids [n, L] (L the longest, at most max_len); a longer sequence keeps its last max_len ids."""
    cut = [s[-max_len:] for s in sequences]
    tokens = torch.full((len(cut), max(map(len, cut))), pad_id, dtype=torch.long)
    for i, s in enumerate(cut):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens


def collate_pairs(pairs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids": [2n, L]}: the n chosen sequences, then the n rejected ones."""
    return {"input_ids": collate_sequences([c for c, _ in pairs] + [r for _, r in pairs], max_len, pad_id)}


class PairLoader:
    """Endless shuffled batches of preference pairs, exactly resumable."""

    def __init__(self, pairs: list, seq_len: int, batch_size: int, pad_id: int, seed: int = 0):
        self.pairs, self.seq_len, self.batch_size, self.pad_id, self.seed = pairs, seq_len, batch_size, pad_id, seed
        self.epoch, self.index = 0, 0

    def __iter__(self) -> PairLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))
            take = order[self.index:self.index + self.batch_size - len(picked)]
            picked += [self.pairs[i] for i in take]
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return collate_pairs(picked, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pairs") != len(self.pairs) or state.get("seed") != self.seed:
            raise ConfigError(f"cannot resume the data position: the run had {state.get('pairs')} pairs (seed "
                              f"{state.get('seed')}), now {len(self.pairs)} (seed {self.seed}); resume with the same "
                              f"--data file and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class PairData:
    """The reward model's data: the pairs of the .jsonl file, split into training and held-out ones."""

    def __init__(self, cfg: RMConfig):
        from seekforge.tokenizer import Tokenizer

        if not cfg.data:
            raise ConfigError("rm: pass the preference pairs with --data FILE.jsonl")
        candidates = [cfg.tokenizer, cfg.init_from]
        self.tokenizer_dir = next((Path(c) for c in candidates if c and (Path(c) / "tokenizer.json").is_file()), None)
        if self.tokenizer_dir is None:
            raise ConfigError("rm: no tokenizer: start from a checkpoint holding tokenizer.json (--init-from), or "
                              "set tokenizer=DIR")
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        self.vocab_size = self.tokenizer.vocab_size
        pairs = read_pairs(cfg.data, self.tokenizer)
        order = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(pairs)).tolist()
        n_val = int(len(pairs) * cfg.val_fraction)
        self.val_pairs = [pairs[i] for i in order[:n_val]]
        self.train_pairs = [pairs[i] for i in order[n_val:]] or pairs

    def batches(self) -> PairLoader:
        cfg = self.cfg
        return PairLoader(self.train_pairs, cfg.seq_len, cfg.batch_size, self.tokenizer.pad_id, cfg.seed)


@torch.no_grad()
def pair_metrics(model, pairs: list, max_len: int, pad_id: int, batch_size: int, device, autocast) -> dict:
    """Held-out metrics of `model` (a RewardModel) on (chosen ids, rejected ids) pairs: accuracy (the share whose
    chosen response scores higher), the mean Bradley-Terry loss, the mean margin r_chosen - r_rejected."""
    was_training = model.training
    model.eval()
    margins = []
    for lo in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[lo:lo + batch_size], max_len, pad_id)["input_ids"].to(device)
        with autocast():
            rewards = model(batch)
        n = batch.shape[0] // 2
        margins.append(rewards[:n] - rewards[n:])
    model.train(was_training)
    if not margins:
        return {}
    margin = torch.cat(margins)
    return {"eval_accuracy": float((margin > 0).float().mean()), "eval_loss": float(-F.logsigmoid(margin).mean()),
            "eval_margin": float(margin.mean()), "eval_pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------- the trainer
class RewardTrainer(LMTrainer):
    """The language model's trainer with the reward model's model, loss and held-out metrics."""

    cfg: RMConfig

    def __init__(self, cfg: RMConfig, out_dir: str | Path, resume: bool = False):
        super().__init__(cfg, out_dir, lambda out: PairData(cfg), resume=resume)

    def make_model(self) -> torch.nn.Module:
        from seekforge.model.reward import RewardModel, load_reward_model

        cfg = self.cfg
        if self.mesh is not None or self.layout.pp > 1 or self.layout.activation_checkpointing:
            raise ConfigError("rm train runs in one process without pipeline stages or activation checkpointing: "
                              "launch it without torchrun and leave parallel.* at its defaults")
        pad_id = self.data.tokenizer.pad_id
        if cfg.init_from:
            return load_reward_model(cfg.init_from, changes=dict(cfg.model_overrides) or None, pad_id=pad_id).train()
        return RewardModel(super().make_model(), pad_id).train()

    def loss(self, batch: dict[str, torch.Tensor], mtp_weight: float,
             weights: dict[str, float] | None = None) -> ModelLoss:
        """Bradley-Terry's loss of a batch of n pairs (rows: the n chosen, then the n rejected), plus the
        sequence-wise balance loss (balance_alpha) of a MoE backbone. `mtp_weight` and `weights` (the
        data-parallel terms' weights) do not apply: no MTP module, one process."""
        rewards, routing = self.model.rewards(batch["input_ids"])
        n = rewards.shape[0] // 2
        main = bradley_terry_loss(rewards[:n], rewards[n:])
        balance = None
        if self.cfg.balance_alpha and routing:
            balance = self.cfg.balance_alpha * sum(sequence_balance_loss(r.scores, r.indices) for r in routing.values())
        total = main if balance is None else main + balance
        return ModelLoss(total, main, None, balance, {layer: r.load for layer, r in routing.items()})

    def evaluate(self) -> dict:
        data, cfg = self.data, self.cfg
        return pair_metrics(self.model, data.val_pairs, cfg.seq_len, data.tokenizer.pad_id, cfg.batch_size,
                            self.device, self.autocast)


def run(cfg: RMConfig, out_dir: str | Path, resume: bool = False, report: bool = True) -> dict:
    return RewardTrainer(cfg, out_dir, resume).run(report)


def evaluate_checkpoint(checkpoint, data: str | os.PathLike, max_len: int = 4096, batch_size: int = 16,
                        device: str = "auto") -> dict:
    """`seekforge rm eval`: a saved reward model's pairwise metrics on every pair of `data`."""
    import contextlib

    from seekforge.model.reward import is_reward_model, load_reward_model
    from seekforge.tokenizer import Tokenizer
    from seekforge.train.optim import pick_device

    if not is_reward_model(checkpoint):
        raise ConfigError(f"{checkpoint} is not a reward model (its config.json names no ...ForSequenceClassification "
                          f"architecture); train one with `seekforge rm train`")
    where = pick_device(device)
    model = load_reward_model(checkpoint, device=where).eval()
    pairs = read_pairs(data, Tokenizer.from_pretrained(checkpoint))
    metrics = pair_metrics(model, pairs, max_len, model.pad_id, batch_size, where, contextlib.nullcontext)
    return {k.removeprefix("eval_"): v for k, v in metrics.items()}
