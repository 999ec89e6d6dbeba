"""A language model trained with the DeepSeek-V3 recipe on the training loop: the trainer of pretraining and
SFT (and so of distillation's students), which differ only in their data (an `LMData`) and, for logit
distillation, an extra loss term (an `Objective`).

One update: grad_accum micro-batches of next-token loss plus the MTP loss (weight mtp_lambda) and the
sequence-wise balance loss (balance_alpha); AdamW under the V3 learning-rate schedule; then the
auxiliary-loss-free balancing moves each MoE gate's bias by the step's expert load (gamma). A batch that
carries "positions" holds packed documents kept apart: each attends only to itself (`document_mask`).

Data parallelism (under torchrun, `seekforge.parallel`): `batch_size` is the global batch, which every rank
reads whole from its loader (so the data position is the same on every rank and layout) and of which it
trains its dp_rank-th slice of rows. FSDP2 averages the ranks' gradients, and a rank's terms are means over
its own tokens, so each term is weighted by the rank's share of the batch's tokens of that term (times the
data-parallel degree): the next-token loss (and distillation's KL, over the same tokens) by the share of
trained labels, the MTP loss by the share of MTP targets (pooled over depths: exact with one MTP module, V3's
number), the sequence-wise balance loss by 1 (every rank holds as many rows). The gradient is then the one
process's gradient of that global batch, also where SFT's masked labels leave the ranks unequal token counts;
the logged losses are the global means. Micro-batches of gradient accumulation stay equal-weighted, as in one
process. A rank whose rows hold no trained token makes the step non-finite (the bad-step guard drops it).

Pipeline parallelism (parallel.pp > 1): the model is this rank's stages (`PipelineModel`) and each micro-batch
of the update is one `PipelineModel.step` (forward and backward of its micro-batches by the schedule), whose
losses (the same on every pp rank) and this stage's expert loads take the place of the model's; evaluation
runs its forward-only schedule. It trains rows that are whole causal sequences with every label a target
(pretraining's); packed documents, masked labels and an extra loss term (distillation) are refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch

from seekforge.errors import ConfigError
from seekforge.fp8.convert import check_recipe, convert_to_fp8
from seekforge.model.moe import add_load
from seekforge.model.mtp import depth_targets
from seekforge.model.transformer import ModelLoss
from seekforge.parallel.mesh import barrier, main_first
from seekforge.parallel.parallelize import gathered
from seekforge.train.balance import update_expert_bias
from seekforge.train.init_from import build_model, model_config
from seekforge.train.loop import NON_FINITE, LoopConfig, Trainer
from seekforge.train.metrics import Throughput, expert_load_stats
from seekforge.train.optim import set_lr
from seekforge.train.schedule import LRSchedule

IGNORE = -100  # the label of a position that is not trained
SINGLE = {"main_loss": 1.0, "mtp_loss": 1.0, "balance_loss": 1.0}  # the loss terms' weights in one process


@dataclass
class LMConfig(LoopConfig):
    """The settings pretraining and SFT share (defaults: pretraining's); steps, cadence, seed, device,
    precision and logging are LoopConfig's."""

    # what to train
    model: str = "tiny"  # preset name, config.json or checkpoint directory (its shape; weights via init_from)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers: 4}; over init_from
    init_from: str | None = None  # a HF checkpoint directory to continue from (overrides keeping shapes apply)
    tokenizer: str | None = None  # tokenizer directory for `data`
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
    compile: bool = False  # torch.compile each block (CUDA; see docs/BENCHMARKS.md for its training speed)
    fp8: str = "none"  # "blockwise": the blocks' GEMMs in FP8 as DeepSeek-V3 trains (seekforge.fp8; simulated on CPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_recipe(self.fp8)
        for key in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.NAME} config: {key} must be >= 1, got {getattr(self, key)}")
        phases = self.warmup_steps + self.constant_steps + self.decay_steps + self.tail_steps
        if phases > self.steps:
            raise ConfigError(f"{self.NAME} config: warmup_steps + constant_steps + decay_steps + tail_steps "
                              f"({phases}) exceed steps ({self.steps}); shorten the phases or raise steps")

    def resume_free(self) -> set[str]:
        return super().resume_free() | {"eval_batches", "compile", "fp8"}  # fp8: how GEMMs run, not what is stored

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


class Batches(Protocol):
    """An endless iterator of training batches ({"input_ids", "labels"[, "positions"]}, [b, s] each) whose
    position in the data resumes exactly."""

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LMData(Protocol):
    """What a language-model trainer trains on."""

    tokenizer_dir: Path | None  # saved beside the final model
    vocab_size: int  # the tokenizer's, which the model's must cover

    def batches(self) -> Batches: ...

    def eval_batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """The held-out batches (the same every evaluation)."""

    def eval_metrics(self, loss: float) -> dict:
        """The evaluation record of a mean held-out loss (nats per trained token)."""


class Objective(Protocol):
    """A term added to the model's loss (logit distillation): the micro-batch's ModelLoss, changed."""

    def __call__(self, out: ModelLoss, batch: dict[str, torch.Tensor],
                 attention: dict[str, torch.Tensor]) -> ModelLoss: ...


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Per-document positions [b, s] (0 where a document starts) -> the causal attention mask within each
    document, bool [b, s, s] (True = may attend). Dense: b * s^2 bytes (4 MiB at batch 16 x 512 tokens,
    256 MiB at 16 x 4096), small beside the activations at SFT lengths."""
    doc = (positions == 0).cumsum(dim=1)
    s = positions.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=positions.device).tril()
    return (doc.unsqueeze(2) == doc.unsqueeze(1)) & causal


def attention(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer.loss's positions and mask for a batch: packed documents kept apart where the batch gives
    their positions; otherwise none, causal over whole rows (pretraining lets packed documents see each
    other, as V3 does)."""
    if "positions" not in batch:
        return {}
    return {"positions": batch["positions"], "mask": document_mask(batch["positions"])}


class LMTrainer(Trainer):
    """The loop's task for a language model: `data(out_dir)` opens its data (after the loop has checked the run
    directory), `objective(trainer)`, when given, builds a term its loss adds. A subclass may train a model built
    on the language model (`make_model`, `loss`, `evaluate`: seekforge.train.reward's reward model)."""

    cfg: LMConfig

    def __init__(self, cfg: LMConfig, out_dir: str | Path, data: Callable[[Path], LMData], resume: bool = False,
                 objective: Callable[[LMTrainer], Objective] | None = None):
        super().__init__(cfg, out_dir, "train_config.yaml", resume=resume)
        dp = self.layout.dp
        if cfg.batch_size % dp:
            raise ConfigError(f"{cfg.NAME} config: batch_size {cfg.batch_size} (the global batch) does not divide by "
                              f"the {dp} data-parallel ranks (parallel.dp_replicate x dp_shard); choose a multiple "
                              f"of {dp}")
        self.data = main_first(lambda: data(self.out))
        self.model_cfg = model_config(cfg.model, cfg.init_from, cfg.model_overrides, self.data.vocab_size,
                                      cfg.seq_len)
        torch.manual_seed(cfg.seed)
        model = self.make_model().to(self.device)
        self.optimize(convert_to_fp8(model, cfg.fp8), compile=cfg.compile)
        self.loader = self.data.batches()
        self.objective = objective(self) if objective is not None else None
        if self.objective is not None and self.layout.pp > 1:
            raise ConfigError(f"{cfg.NAME}: a loss term beside the model's (distillation) with parallel.pp > 1: the "
                              f"pipeline computes the model's loss in its last stage only; set parallel.pp=1")
        self.speed = Throughput()
        self.loop.start(self)

    def make_model(self) -> torch.nn.Module:
        """The model to train, built under the run's seed: `init_from`'s weights or a fresh one of `model_cfg`. A
        trainer whose model is built on the language model (the reward model's) builds its own here, and gives
        its loss in `loss` and its held-out metrics in `evaluate`."""
        return build_model(self.model_cfg, self.cfg.init_from, self.cfg.model_overrides)

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    def my_rows(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """This rank's rows of a global batch, and the weights of its loss terms by ModelLoss field: the rank's
        share of the batch's tokens of each term times the data-parallel degree (see the module doc); all 1 in a
        single process."""
        if self.mesh is None:
            return batch, dict(SINGLE)
        mine = self.mesh.rows(batch)

        def share(count) -> float:
            total = count(batch)
            return count(mine) * self.mesh.dp_size / total if total else 1.0

        def mtp_targets(b: dict[str, torch.Tensor]) -> int:
            depths = range(1, min(self.model_cfg.n_mtp_modules + 1, b["labels"].shape[1]))
            return sum(int((depth_targets(b["labels"], k, b.get("positions"), IGNORE) != IGNORE).sum()) for k in depths)

        return mine, {"main_loss": share(lambda b: int((b["labels"] != IGNORE).sum())), "mtp_loss": share(mtp_targets),
                      "balance_loss": 1.0}

    def loss(self, batch: dict[str, torch.Tensor], mtp_weight: float,
             weights: dict[str, float] = SINGLE) -> ModelLoss:
        """The training objective of one micro-batch; with a data-parallel rank's term `weights` (`my_rows`), its
        `loss` times weights["main_loss"] is the rank's share of the global batch's (the objective is linear in
        the model's loss)."""
        mask = attention(batch)
        out = self.model.loss(batch["input_ids"], batch["labels"], mtp_weight=mtp_weight,
                              balance_alpha=self.cfg.balance_alpha, **mask)
        main = weights["main_loss"]
        if main and weights != SINGLE:  # the other terms' weights, relative to the main term's
            if out.mtp_loss is not None:
                out.loss = out.loss + mtp_weight * (weights["mtp_loss"] / main - 1) * out.mtp_loss
            if out.balance_loss is not None:
                out.loss = out.loss + (weights["balance_loss"] / main - 1) * out.balance_loss
        return out if self.objective is None else self.objective(out, batch, mask)

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

        def losses() -> Iterator[torch.Tensor]:
            for _ in range(cfg.grad_accum):
                batch, weights = self.my_rows(next(self.loader))
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.autocast():
                    out = self.loss(batch, mtp_weight, weights)
                weights["loss"] = weights["main_loss"]
                yield out.loss * weights["loss"] / cfg.grad_accum
                for key in totals:
                    value = getattr(out, key)
                    if value is not None:
                        totals[key] += float(value.detach()) * weights[key] / cfg.grad_accum
                add_load(loads, out.expert_load)

        grad_norm = self._pipeline_update(mtp_weight, totals, loads) if self.layout.pp > 1 else \
            self.apply_update(losses())
        record = {"lr": lr, "mtp_weight": mtp_weight, "grad_norm": grad_norm}
        if math.isnan(grad_norm):
            return {**record, "skipped": True, "reason": NON_FINITE, "loss": math.nan}
        if self.mesh is not None:  # the global means and the global expert load: one bias update on every rank
            means = self.mesh.dp_sum(torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device))
            totals = dict(zip(totals, (means / self.mesh.dp_size).tolist()))
            if loads:
                layers = sorted(loads)
                summed = self.mesh.dp_sum(torch.stack([loads[layer] for layer in layers]))
                loads = dict(zip(layers, summed))
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

    def _pipeline_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch for the pipeline, which trains rows that all hold the same
        number of targets and attend causally over whole rows (pretraining's batches)."""
        batch, weights = self.my_rows(next(self.loader))
        if "positions" in batch or any(w != 1.0 for w in weights.values()):
            raise ConfigError(f"{self.cfg.NAME}: parallel.pp > 1 trains batches of whole causal rows with every "
                              f"label a target (pretraining's); these rows hold packed documents or masked labels: "
                              f"train them with parallel.pp=1")
        return {k: v.to(self.device) for k, v in batch.items()}

    def _pipeline_update(self, mtp_weight: float, totals: dict[str, float], loads: dict[int, torch.Tensor]) -> float:
        """One update through the PipelineModel (forward and backward of each micro-batch by its schedule): adds
        the losses (equal on every pp rank) to `totals` and this rank's MoE layers' loads to `loads`; returns
        the gradient norm (NaN when the bad-step guard drops the update)."""
        cfg, finite = self.cfg, True
        for _ in range(cfg.grad_accum):
            batch = self._pipeline_batch()
            with self.autocast():
                out, step_loads = self.model.step(batch["input_ids"], batch["labels"], mtp_weight, cfg.balance_alpha)
            finite = self.all_finite(torch.tensor(out["loss"])) and finite
            for key in totals:
                if out[key] is not None:
                    totals[key] += out[key] / cfg.grad_accum
            add_load(loads, step_loads)
        if cfg.grad_accum > 1:  # the schedule sums each step's gradients: the mean over the micro-batches' steps
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(cfg.grad_accum)
        return self.finish_update(finite)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        for whole in self.data.eval_batches():
            batch = whole if self.mesh is None else self.mesh.rows(whole)
            n = int((batch["labels"] != IGNORE).sum())
            if not n:  # no row or no target here: a forward all the same (FSDP2's collectives), not counted
                batch = {k: v[:1] for k, v in whole.items()}
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                if self.layout.pp > 1:
                    loss = self.model.evaluate(batch["input_ids"], batch["labels"])
                else:
                    loss = float(self.model.loss(batch["input_ids"], batch["labels"], **attention(batch)).main_loss)
            if n:
                total += loss * n
                count += n
        self.model.train()
        if self.mesh is not None:
            sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            total, count = self.mesh.dp_sum(sums).tolist()
        return self.data.eval_metrics(total / count) if count else {}

    def export(self) -> Path:
        """The final model in Hugging Face layout (with its tokenizer) under DIR/final."""
        final = self.out / "final"
        model = gathered(self.model, self.mesh)  # None on ranks other than 0
        if model is not None:
            model.save_pretrained(final)
            if self.data.tokenizer_dir is not None:
                from seekforge.tokenizer import Tokenizer

                Tokenizer.from_pretrained(self.data.tokenizer_dir).save_pretrained(final)
        barrier()
        return final
