"""Pretraining with the DeepSeek-V3 recipe: AdamW, the V3 LR schedule, MTP loss, auxiliary-loss-free
balancing plus a small sequence-wise balance loss; resumable bit for bit, observable step by step.

    seekforge train --config tiny --out runs/tiny                 # a built-in config
    seekforge train --config my.yaml --out runs/x steps=2000 lr=1e-3
    seekforge train --config my.yaml --out runs/x --resume        # continue exactly where it stopped
    seekforge train --out runs/long init_from=runs/tiny/final seq_len=4096 model_overrides.rope_factor=4 \
        model_overrides.original_seq_len=1024 model_overrides.max_seq_len=4096  # YaRN context extension

DIR/metrics.jsonl gets one line per step, DIR/checkpoints the resumable state, DIR/final the model in
Hugging Face layout with its tokenizer, DIR/report.md and DIR/plots a report card.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekforge.configio import load_config, to_dict
from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.moe import add_load
from seekforge.model.transformer import Transformer
from seekforge.train.balance import update_expert_bias
from seekforge.train.checkpoint import config_fingerprint
from seekforge.train.init_from import build_model, model_config
from seekforge.train.loop import NON_FINITE, Loop, LoopConfig, LoopStep, train_and_export
from seekforge.train.metrics import Throughput, expert_load_stats
from seekforge.train.optim import autocast_dtype, build_adamw, pick_device, set_lr
from seekforge.train.schedule import LRSchedule


@dataclass
class TrainConfig(LoopConfig):
    # steps, evaluation and checkpoint cadence, seed, device, precision, logging: LoopConfig's
    # what to train, on what
    model: str = "tiny"  # preset name, config.json or checkpoint directory (its shape; weights via init_from)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers: 4}; over init_from
    init_from: str | None = None  # a HF checkpoint directory to continue from (overrides keeping shapes apply)
    data: str = "builtin"  # a `seekforge data prepare` directory, or "builtin" (generated math, no download)
    tokenizer: str | None = None  # tokenizer directory for `data` (the builtin data brings its own)
    builtin_docs: int = 20000
    builtin_vocab: int = 1024
    builtin_tasks: dict = field(default_factory=dict)  # task -> difficulty knobs for "builtin"; {} = all, default
    builtin_slip_rate: float = 0.0  # share of careless "builtin" documents (one slip, a wrong answer)
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    # optimizer and the V3 learning-rate schedule (hold at final_lr fills the steps left over)
    lr: float = 3e-3
    warmup_steps: int = 50
    constant_steps: int = 400
    decay_steps: int = 500
    final_lr: float = 3e-4
    tail_steps: int = 0
    tail_lr: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # DeepSeek-V3 specifics
    mtp_weight: float = 0.3  # lambda, until mtp_switch_step
    mtp_weight_late: float = 0.1  # lambda afterwards
    mtp_switch_step: int | None = None  # default: 2/3 of the steps (V3: 10T of 14.8T tokens)
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free balancing
    bias_freeze_step: int | None = None  # gamma = 0 from here on (V3: the last 500B tokens)
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    eval_batches: int = 8
    compile: bool = False  # torch.compile each block (CUDA; 1.35x faster training at the 16b shape on an H200)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train config: {key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.builtin_slip_rate < 1.0:
            raise ConfigError(f"train config: builtin_slip_rate must be in [0, 1), got {self.builtin_slip_rate}")
        if self.warmup_steps + self.constant_steps + self.decay_steps + self.tail_steps > self.steps:
            raise ConfigError(f"train config: warmup_steps + constant_steps + decay_steps + tail_steps "
                              f"({self.warmup_steps + self.constant_steps + self.decay_steps + self.tail_steps}) "
                              f"exceed steps ({self.steps}); shorten the phases or raise steps")

    def schedule(self) -> LRSchedule:
        hold = self.steps - self.warmup_steps - self.constant_steps - self.decay_steps - self.tail_steps
        return LRSchedule(peak_lr=self.lr, warmup_steps=self.warmup_steps, constant_steps=self.constant_steps,
                          decay_steps=self.decay_steps, final_lr=self.final_lr, hold_steps=hold,
                          tail_steps=self.tail_steps, tail_lr=self.tail_lr)

    def mtp_lambda(self, step: int) -> float:
        switch = self.mtp_switch_step if self.mtp_switch_step is not None else (2 * self.steps) // 3
        return self.mtp_weight if step < switch else self.mtp_weight_late

    def gamma(self, step: int) -> float:
        frozen = self.bias_freeze_step is not None and step >= self.bias_freeze_step
        return 0.0 if frozen else self.bias_update_speed

    def fingerprint(self) -> str:
        """What must not change across a resume (cadence and presentation may)."""
        free = set(self.RESUME_FREE) | {"eval_batches", "compile"}
        for key in ("builtin_tasks", "builtin_slip_rate"):  # absent before the field existed: runs made then
            if not getattr(self, key):                      # still resume
                free.add(key)
        return config_fingerprint({k: v for k, v in to_dict(self).items() if k not in free})


BUILTIN_CONFIGS: dict[str, dict] = {
    # seconds on a CPU: tests and smoke runs
    "tiny": dict(model="tiny", seq_len=64, batch_size=8, steps=40, lr=3e-3, warmup_steps=5, constant_steps=15,
                 decay_steps=20, final_lr=3e-4, eval_every=20, eval_batches=2, save_every=20, builtin_docs=3000,
                 builtin_vocab=512),
    # the quickstart: a small MLA + MoE + MTP model on generated chain sums (the task its RL stage trains), 40% of
    # them careless (what RL then removes), minutes on a 2-core CPU; the decay stops at a third of the peak
    # learning rate (RL continues below it)
    "quickstart": dict(model="tiny", model_overrides=dict(dim=128, n_layers=4, inter_dim=384, moe_inter_dim=64,
                                                          max_seq_len=512), seq_len=192, batch_size=16,
                       steps=1000, lr=3e-3, warmup_steps=20, constant_steps=780, decay_steps=200, final_lr=1e-3,
                       eval_every=200, eval_batches=8, save_every=200, builtin_docs=8000, builtin_vocab=512,
                       builtin_tasks={"chain_sum": {"max_value": 9, "min_terms": 2, "max_terms": 4}},
                       builtin_slip_rate=0.4),
    # a base model for context extension (`seekforge extend`) on a CPU: 64 tokens of context, chain sums and
    # passkey retrieval documents that fit in it
    "passkey": dict(model="tiny", model_overrides=dict(max_seq_len=64), seq_len=64, batch_size=16, steps=600,
                    lr=3e-3, warmup_steps=20, constant_steps=480, decay_steps=100, final_lr=3e-4, eval_every=200,
                    eval_batches=4, save_every=200, builtin_docs=6000, builtin_vocab=512,
                    builtin_tasks={"chain_sum": {"max_value": 9, "min_terms": 2, "max_terms": 4},
                                   "passkey": {"max_filler": 4}}),
    # about 100M parameters: a GPU run
    "small": dict(model="small", seq_len=1024, batch_size=32, steps=5000, lr=1e-3, warmup_steps=200,
                  constant_steps=2800, decay_steps=2000, final_lr=1e-4, eval_every=250, save_every=500,
                  builtin_docs=200000, builtin_vocab=8192),
}


def load_train_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, name_or_path, BUILTIN_CONFIGS, list(overrides))


class Trainer(LoopStep):
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = pick_device(cfg.device)
        self.amp = autocast_dtype(self.device, cfg.precision)
        self.loop = Loop(cfg, self.out, "train_config.yaml", resume=resume)
        self.ckpt = self.loop.ckpt
        self.data_dir, self.tokenizer_dir = self._data()
        self.model_cfg = self._model_config()
        torch.manual_seed(cfg.seed)
        self.model = self._build_model().to(self.device)
        if cfg.compile:
            from seekforge.train.compile import compile_blocks

            compile_blocks(self.model, self.amp)
        self.optimizer = build_adamw(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.schedule = cfg.schedule()
        self.loader = self._build_loader()
        self.speed = Throughput()
        self.loop.start(self)

    # ---------------------------------------------------------------- setup
    def _data(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        if cfg.data != "builtin":
            return Path(cfg.data), Path(cfg.tokenizer) if cfg.tokenizer else None
        from seekforge.data.corpus import build_builtin_dataset
        from seekforge.data.loader import load_meta

        data_dir = self.out / "data"
        if not (data_dir / "meta.json").is_file():
            build_builtin_dataset(data_dir, n_docs=cfg.builtin_docs, seed=cfg.seed, vocab_size=cfg.builtin_vocab,
                                  slip_rate=cfg.builtin_slip_rate, progress=cfg.progress,
                                  **({"tasks": cfg.builtin_tasks} if cfg.builtin_tasks else {}))
        load_meta(data_dir)
        return data_dir, data_dir / "tokenizer"

    def _vocab_size(self) -> int:
        """The tokenizer's vocabulary, which the model's must cover."""
        from seekforge.data.loader import load_meta

        return load_meta(self.data_dir)["vocab_size"]

    def _model_config(self) -> ModelConfig:
        cfg = self.cfg
        return model_config(cfg.model, cfg.init_from, cfg.model_overrides, self._vocab_size(), cfg.seq_len)

    def _build_loader(self):
        """An endless iterator of {"input_ids", "labels"} batches with state_dict / load_state_dict."""
        from seekforge.data.loader import PackedLoader

        return PackedLoader(self.data_dir, "train", self.cfg.seq_len, self.cfg.batch_size, seed=self.cfg.seed)

    def _build_model(self) -> Transformer:
        return build_model(self.model_cfg, self.cfg.init_from, self.cfg.model_overrides)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])

    # ---------------------------------------------------------------- one step
    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self) -> dict:
        """One optimizer update (grad_accum micro-batches) at step self.step; its metrics record."""
        cfg = self.cfg
        start = time.perf_counter()
        record = self._update()
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        record["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        record["tokens_per_s_smooth"] = self.speed.update(tokens)
        return record

    def _update(self) -> dict:
        cfg, model = self.cfg, self.model
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr)
        mtp_weight = cfg.mtp_lambda(self.step)
        totals = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        loads: dict[int, torch.Tensor] = {}  # by MoE layer id: the layers that ran (MTP blocks only with mtp_weight)
        finite = True
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(self.loader).items()}
            with self._autocast():
                out = self._loss(batch, mtp_weight)
            if not torch.isfinite(out.loss):
                finite = False
                break
            (out.loss / cfg.grad_accum).backward()
            for key in totals:
                value = getattr(out, key)
                if value is not None:
                    totals[key] += float(value.detach()) / cfg.grad_accum
            add_load(loads, out.expert_load)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if finite else math.nan
        record = {"lr": lr, "mtp_weight": mtp_weight, "grad_norm": grad_norm}
        if not (finite and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return {**record, "skipped": True, "reason": NON_FINITE, "loss": math.nan}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model.moe_layers(), loads, cfg.gamma(self.step))
        record.update(totals, skipped=False)
        if loads:
            moes = model.moe_layers()
            # in the model's layer order: the main layers (which always run), then the MTP blocks that ran
            stats = expert_load_stats(torch.stack([loads[layer] for layer in moes if layer in loads]))
            record["load_max_min"], record["load_cv"] = stats["max_min_ratio"], stats["cv"]
            # one row per MoE layer; empty for a layer that did not run this step
            record["expert_load"] = [loads[layer].tolist() if layer in loads else [] for layer in moes]
            record["expert_bias"] = [m.gate.bias.tolist() for m in moes.values()]
        return record

    def _attention(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Transformer.loss's positions and mask for a batch; none: causal over whole rows (pretraining lets
        packed documents see each other, as V3 does)."""
        return {}

    def _loss(self, batch: dict[str, torch.Tensor], mtp_weight: float):
        """The training objective of one micro-batch (a ModelLoss); subclasses add terms to it."""
        return self.model.loss(batch["input_ids"], batch["labels"], mtp_weight=mtp_weight,
                               balance_alpha=self.cfg.balance_alpha, **self._attention(batch))

    @torch.no_grad()
    def evaluate(self) -> dict:
        from seekforge.data.loader import bits_per_byte, eval_batches

        self.model.eval()
        total, count = 0.0, 0
        for batch in eval_batches(self.data_dir, self.cfg.seq_len, self.cfg.batch_size, self.cfg.eval_batches):
            tokens, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            with self._autocast():
                out = self.model.loss(tokens, labels)
            n = int((labels != -100).sum())
            total += float(out.main_loss) * n
            count += n
        self.model.train()
        if not count:
            return {}
        loss = total / count
        return {"eval_loss": loss, "eval_bpb": bits_per_byte(loss, self.data_dir, "val")}

    def train(self) -> dict:
        """Train to cfg.steps (seekforge.train.loop); returns the last step's record."""
        return self.loop.run(self)

    def export(self) -> Path:
        """The final model in Hugging Face layout (with its tokenizer) under DIR/final."""
        final = self.out / "final"
        self.model.save_pretrained(final)
        if self.tokenizer_dir is not None:
            from seekforge.tokenizer import Tokenizer

            Tokenizer.from_pretrained(self.tokenizer_dir).save_pretrained(final)
        return final


def run(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, report: bool = True) -> dict:
    return train_and_export(Trainer(cfg, out_dir, resume=resume), out_dir, report)
