"""Two-stage YaRN context extension, as DeepSeek-V3 did it: a model pretrained at its original context continues
pretraining with YaRN-scaled rotary frequencies on long documents, first at a longer context, then at the
longest (V3: 4K -> 32K -> 128K with scale s = 40, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1,
1000 steps each at a constant learning rate of 7.3e-6, the same tokens per step in both stages).

    seekforge extend --from runs/base/final --out runs/long --factor 16 --stages 4,16

The YaRN settings are the same in every stage (V3 keeps s = 40 for both); a stage's length is a multiple of
the original context. DIR/data-<len> holds a stage's long documents (seekforge.data.long_docs, tokenized with
the checkpoint's tokenizer); DIR/stage<k> is an ordinary pretraining run (metrics, checkpoints, report) whose
final/ is a Hugging Face checkpoint with the rope_scaling in config.json. Then the base model, the base model
with YaRN and no training, and every stage are evaluated (seekforge.train.long_eval) on the last stage's
held-out documents: DIR/long_context.json, DIR/plots, DIR/report.md. --resume keeps finished stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from seekforge.configio import atomic_write_text, from_dict, load_config, save_config
from seekforge.errors import ConfigError


@dataclass
class ExtendConfig:
    init_from: str = ""  # the checkpoint to extend (Hugging Face layout with its tokenizer)
    # YaRN, as V3 sets it (its config.json: factor 40, original 4096, beta_fast 32, beta_slow 1, mscale 1, 1)
    factor: float = 16.0
    original_seq_len: int | None = None  # None: the checkpoint's context (max_seq_len; original_seq_len if YaRN)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    stages: list[float] = field(default_factory=lambda: [4.0, 16.0])  # training lengths / original_seq_len
    # training in each stage: constant learning rate after a short warm-up, the same tokens per step
    steps: int = 60
    lr: float = 1e-3
    warmup_steps: int = 10
    tokens_per_step: int = 4096
    train: dict = field(default_factory=dict)  # any other pretraining field for every stage, e.g. {grad_accum: 4}
    # long documents: input files (as `seekforge data prepare` reads them), else the built-in tasks
    data: list[str] = field(default_factory=list)
    tasks: dict = field(default_factory=lambda: {"chain_sum": {"max_value": 9, "min_terms": 2, "max_terms": 4}})
    passkey_share: float = 0.3
    passkey: dict = field(default_factory=dict)  # the passkey task's knobs, e.g. {loss: answer}: train the key only
    data_tokens: int | None = None  # built-in documents per stage, in tokens; None: steps * tokens_per_step
    # evaluation of the base model and every stage
    eval: bool = True
    eval_multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_samples: int = 8
    eval_windows: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.factor <= 1.0:
            raise ConfigError(f"extend: factor (YaRN's scale) must be > 1, got {self.factor}")
        if not self.stages or any(b <= a for a, b in zip([1.0, *self.stages], self.stages)):
            raise ConfigError(f"extend: stages must be rising multiples of the original context above 1, "
                              f"e.g. [4, 16]; got {self.stages}")
        if self.stages[-1] > self.factor:
            raise ConfigError(f"extend: the last stage ({self.stages[-1]}x) exceeds YaRN's factor ({self.factor}): "
                              f"the model's context is factor x original_seq_len; raise factor or shorten stages")
        for key in ("steps", "tokens_per_step", "eval_samples", "eval_windows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"extend: {key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"extend: warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        from seekforge.tasks import get_task

        get_task("passkey", **self.passkey)  # a bad knob fails here, not after the first stage's data
        if self.original_seq_len is not None and self.original_seq_len < 1:
            raise ConfigError(f"extend: original_seq_len must be >= 1, got {self.original_seq_len}")

    def yarn(self, original: int) -> dict:
        """The ModelConfig fields every stage's model gets (config.json's rope_scaling)."""
        return dict(rope_factor=self.factor, original_seq_len=original, max_seq_len=round(self.factor * original),
                    beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                    mscale_all_dim=self.mscale_all_dim)


BUILTIN_CONFIGS: dict[str, dict] = {
    # CPU minutes: a `seekforge train --config passkey` model (64 tokens) to 256 and then 1024
    "toy": {},
    # DeepSeek-V3's recipe: 4K -> 32K -> 128K, s = 40, 1000 steps each at 7.3e-6 (V3's batch: 1920 x 32K and
    # 480 x 128K sequences, 63M tokens a step; set tokens_per_step to what the GPUs hold, with train.grad_accum)
    "v3": dict(factor=40.0, stages=[8.0, 32.0], steps=1000, lr=7.3e-6, warmup_steps=0, tokens_per_step=2**20,
               eval_multiples=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0], eval_samples=4, eval_windows=1),
}


def load_extend_config(name_or_path: str, overrides: list[str] = ()) -> ExtendConfig:
    return load_config(ExtendConfig, name_or_path, BUILTIN_CONFIGS, list(overrides))


def original_length(checkpoint: str | Path, given: int | None) -> int:
    """The context the checkpoint was trained at: `given`, else the original length of its YaRN scaling, else
    its max_seq_len (max_position_embeddings)."""
    from seekforge.model.config import ModelConfig

    if given:
        return given
    cfg = ModelConfig.load(checkpoint)
    return cfg.original_seq_len if cfg.rope_factor > 1.0 else cfg.max_seq_len


def stage_config(cfg: ExtendConfig, init_from: Path, data_dir: Path, seq_len: int, original: int):
    """The pretraining run of one stage: init_from's weights under YaRN at seq_len on data_dir."""
    from seekforge.train.pretrain import TrainConfig

    every = max(1, cfg.steps // 2)
    data = dict(model=str(init_from), init_from=str(init_from), model_overrides=cfg.yarn(original),
                data=str(data_dir), tokenizer=str(data_dir / "tokenizer"), seq_len=seq_len,
                batch_size=max(1, cfg.tokens_per_step // seq_len), steps=cfg.steps, lr=cfg.lr, final_lr=cfg.lr,
                warmup_steps=cfg.warmup_steps, constant_steps=cfg.steps - cfg.warmup_steps, decay_steps=0,
                eval_every=every, save_every=every, eval_batches=4, seed=cfg.seed, device=cfg.device,
                precision=cfg.precision, progress=cfg.progress, tensorboard=cfg.tensorboard)
    data.update(cfg.train)
    return from_dict(TrainConfig, data, where="extend stage")


def run(cfg: ExtendConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Every stage (finished ones kept under resume), then the evaluation; returns the summary."""
    from seekforge.data.long_docs import build_long_dataset
    from seekforge.tokenizer import Tokenizer
    from seekforge.train import long_eval, pretrain

    if not cfg.init_from:
        raise ConfigError("extend: give the checkpoint to extend (--from DIR or init_from=DIR)")
    base, out = Path(cfg.init_from), Path(out_dir)
    original = original_length(base, cfg.original_seq_len)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "extend_config.yaml")
    tokenizer = Tokenizer.from_pretrained(base)
    previous, stages, times = base, [], {}
    for k, multiple in enumerate(cfg.stages, start=1):
        seq_len = round(multiple * original)
        data_dir, stage_dir = out / f"data-{seq_len}", out / f"stage{k}"
        started = time.perf_counter()
        if not (data_dir / "meta.json").is_file():
            build_long_dataset(data_dir, tokenizer, seq_len, cfg.data_tokens or cfg.steps * cfg.tokens_per_step,
                               inputs=cfg.data, tasks=cfg.tasks, passkey_share=cfg.passkey_share,
                               passkey=cfg.passkey, seed=cfg.seed + k, progress=cfg.progress)
        if not (resume and (stage_dir / "final" / "config.json").is_file()):
            pretrain.run(stage_config(cfg, previous, data_dir, seq_len, original), stage_dir,
                         resume=resume and (stage_dir / "checkpoints").is_dir())
        times[f"stage{k}"] = time.perf_counter() - started
        previous = stage_dir / "final"
        stages.append({"stage": k, "seq_len": seq_len, "multiple": multiple, "checkpoint": str(previous)})
        print(f"[stage {k}/{len(cfg.stages)}] {seq_len} tokens ({multiple:g}x): {previous}", flush=True)
    summary = {"init_from": str(base), "original_seq_len": original, "yarn": cfg.yarn(original), "stages": stages,
               "seconds": {k: round(v, 1) for k, v in times.items()}}
    if cfg.eval:
        models = {"base": (base, None), "base + YaRN, untrained": (base, cfg.yarn(original))}
        models.update({f"stage {s['stage']} ({s['multiple']:g}x)": (Path(s["checkpoint"]), None) for s in stages})
        summary["long_context"] = long_eval.evaluate_models(
            models, out / f"data-{stages[-1]['seq_len']}", original, cfg.eval_multiples, cfg.eval_depths,
            cfg.eval_samples, cfg.eval_windows, cfg.seed, cfg.device, out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", _report(summary, cfg, out))
    return summary


def _report(summary: dict, cfg: ExtendConfig, out: Path) -> str:
    from seekforge.train import long_eval

    yarn = summary["yarn"]
    md = ["# seekforge extend: YaRN context extension", "",
          f"From `{summary['init_from']}` (original context {summary['original_seq_len']} tokens), YaRN factor "
          f"{yarn['rope_factor']:g}, beta_fast {yarn['beta_fast']:g}, beta_slow {yarn['beta_slow']:g}, mscale "
          f"{yarn['mscale']:g}, mscale_all_dim {yarn['mscale_all_dim']:g}; model context {yarn['max_seq_len']}.", "",
          "| stage | length | steps | tokens / step | lr | time | run |", "|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        name = f"stage{s['stage']}"
        md.append(f"| {s['stage']} | {s['seq_len']} ({s['multiple']:g}x) | {cfg.steps} | "
                  f"{max(1, cfg.tokens_per_step // s['seq_len']) * s['seq_len']} | {cfg.lr:g} | "
                  f"{summary['seconds'][name] / 60:.1f} min | [{name}]({name}/report.md) |")
    md.append("")
    if "long_context" in summary:
        md += long_eval.section(out)
    return "\n".join(md)

