"""Pretraining with the DeepSeek-V3 recipe: AdamW, the V3 LR schedule, MTP loss, auxiliary-loss-free
balancing plus a small sequence-wise balance loss; resumable bit for bit, observable step by step.

    seekforge train --config tiny --out runs/tiny                 # a built-in config
    seekforge train --config my.yaml --out runs/x steps=2000 lr=1e-3
    seekforge train --config my.yaml --out runs/x --resume        # continue exactly where it stopped
    seekforge train --out runs/long init_from=runs/tiny/final seq_len=4096 model_overrides.rope_factor=4 \
        model_overrides.original_seq_len=1024 model_overrides.max_seq_len=4096  # YaRN context extension

DIR/metrics.jsonl gets one line per step, DIR/checkpoints the resumable state, DIR/final the model in
Hugging Face layout with its tokenizer, DIR/report.md and DIR/plots a report card. The trainer is
seekforge.train.lm's on the training loop; pretraining supplies its data: a prepared corpus or the built-in
generated one, packed into rows (documents see each other across a row's boundaries, as in V3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from seekforge.configio import load_config
from seekforge.errors import ConfigError
from seekforge.train.lm import LMConfig, LMTrainer


@dataclass
class TrainConfig(LMConfig):
    """Pretraining: LMConfig's settings and the data to pretrain on."""

    NAME: ClassVar[str] = "train"
    data: str = "builtin"  # a `seekforge data prepare` directory, or "builtin" (generated math, no download)
    builtin_docs: int = 20000
    builtin_vocab: int = 1024
    builtin_tasks: dict = field(default_factory=dict)  # task -> difficulty knobs for "builtin"; {} = all, default
    builtin_slip_rate: float = 0.0  # share of careless "builtin" documents (one slip, a wrong answer)
    # "packed": windows of the token stream (V3's); "documents": one document to a row from its start, padded
    # (seekforge.data.loader.DocumentLoader), with a length curriculum over the first curriculum_steps steps
    # from documents of curriculum_min tokens to whole rows
    rows: str = "packed"
    curriculum_steps: int = 0
    curriculum_min: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.builtin_slip_rate < 1.0:
            raise ConfigError(f"train config: builtin_slip_rate must be in [0, 1), got {self.builtin_slip_rate}")
        if self.rows not in ("packed", "documents"):
            raise ConfigError(f"train config: rows must be 'packed' or 'documents', got {self.rows!r}")
        if self.curriculum_steps < 0 or self.curriculum_min < 0:
            raise ConfigError(f"train config: curriculum_steps and curriculum_min must be >= 0, got "
                              f"{self.curriculum_steps} and {self.curriculum_min}")
        if self.curriculum_steps and self.rows != "documents":
            raise ConfigError("train config: a length curriculum (curriculum_steps) draws whole documents: set "
                              "rows=documents")

    def resume_free(self) -> set[str]:
        # left at their defaults, these do not count: runs made before the fields existed still resume
        defaults = {"builtin_tasks": {}, "builtin_slip_rate": 0.0, "rows": "packed", "curriculum_steps": 0,
                    "curriculum_min": 0}
        return super().resume_free() | {k for k, v in defaults.items() if getattr(self, k) == v}


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
    # passkey documents of the whole context trained on their key, one document to a row, at lr 1e-3. It reads
    # keys at every depth; from shorter passkey documents the tiny model learns to read only keys near the
    # question, from packed windows or at 3e-3 none (docs/LONG_CONTEXT.md)
    "passkey": dict(model="tiny", model_overrides=dict(max_seq_len=64), seq_len=64, batch_size=16, steps=1500,
                    lr=1e-3, warmup_steps=20, constant_steps=1380, decay_steps=100, final_lr=1e-4, eval_every=500,
                    eval_batches=4, save_every=500, builtin_docs=6000, builtin_vocab=512, rows="documents",
                    builtin_tasks={"chain_sum": {"max_value": 9, "min_terms": 2, "max_terms": 4},
                                   "passkey": {"min_filler": 5, "max_filler": 6, "loss": "answer"}}),
    # about 100M parameters: a GPU run
    "small": dict(model="small", seq_len=1024, batch_size=32, steps=5000, lr=1e-3, warmup_steps=200,
                  constant_steps=2800, decay_steps=2000, final_lr=1e-4, eval_every=250, save_every=500,
                  builtin_docs=200000, builtin_vocab=8192),
}


def load_train_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, name_or_path, BUILTIN_CONFIGS, list(overrides))


class CorpusData:
    """Pretraining's data (LMData): a prepared corpus, or the built-in one generated into DIR/data."""

    def __init__(self, cfg: TrainConfig, out_dir: Path):
        from seekforge.data.loader import load_meta

        self.cfg = cfg
        if cfg.data != "builtin":
            self.data_dir, self.tokenizer_dir = Path(cfg.data), Path(cfg.tokenizer) if cfg.tokenizer else None
        else:
            from seekforge.data.corpus import build_builtin_dataset

            self.data_dir = out_dir / "data"
            if not (self.data_dir / "meta.json").is_file():
                build_builtin_dataset(self.data_dir, n_docs=cfg.builtin_docs, seed=cfg.seed,
                                      vocab_size=cfg.builtin_vocab, slip_rate=cfg.builtin_slip_rate,
                                      progress=cfg.progress,
                                      **({"tasks": cfg.builtin_tasks} if cfg.builtin_tasks else {}))
            self.tokenizer_dir = self.data_dir / "tokenizer"
        meta = load_meta(self.data_dir)
        self.vocab_size = meta["vocab_size"]
        if cfg.rows == "documents":  # rows open as the engine's prompts do: BOS where the tokenizer adds it
            from seekforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir or self.data_dir / meta["tokenizer_dir"])
            self.pad_id, self.bos_id = meta["eos_id"], tokenizer.bos_id if tokenizer.add_bos_token else None

    def batches(self):
        from seekforge.data.loader import DocumentLoader, PackedLoader

        cfg = self.cfg
        if cfg.rows == "documents":
            return DocumentLoader(self.data_dir, "train", cfg.seq_len, cfg.batch_size, self.pad_id, self.bos_id,
                                  cfg.seed, cfg.curriculum_steps, cfg.curriculum_min)
        return PackedLoader(self.data_dir, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed)

    def eval_batches(self):
        from seekforge.data.loader import eval_batches, eval_documents

        cfg = self.cfg
        if cfg.rows == "documents":
            return eval_documents(self.data_dir, cfg.seq_len, cfg.batch_size, self.pad_id, self.bos_id,
                                  cfg.eval_batches)
        return eval_batches(self.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_batches)

    def eval_metrics(self, loss: float) -> dict:
        from seekforge.data.loader import bits_per_byte

        return {"eval_loss": loss, "eval_bpb": bits_per_byte(loss, self.data_dir, "val")}


def build_trainer(cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> LMTrainer:
    """A pretraining run in `out_dir`, built and (with `resume`) restored, ready to train()."""
    return LMTrainer(cfg, out_dir, lambda out: CorpusData(cfg, out), resume=resume)


def run(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, report: bool = True) -> dict:
    return build_trainer(cfg, out_dir, resume).run(report)
