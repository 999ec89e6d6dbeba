"""The training loop every trainer runs (pretraining, SFT and distillation's students, GRPO).

A trainer supplies its batches and its loss: it is a `Trainer` (this module's base) whose `train_step` makes
one update from its own data (for GRPO, rollout + update) through `Trainer.apply_update`, and whose
`evaluate`, `state_dict` and `export` say how to measure, resume and ship it. The rest is here, the same for
all of them: device and precision, the run directory (refusing to overwrite a run unless resuming, the
config's fingerprint), the AdamW optimizer and learning-rate schedule, step counting, exact resume from the
latest checkpoint, metrics.jsonl / TensorBoard, the progress bar, periodic evaluation and checkpoints, and
the bad-step guard: an update whose loss or gradients are not finite is dropped (`apply_update` zeroes the
gradients and takes no step; the record says `skipped` with `reason` = NON_FINITE), counted, never
checkpointed, and `max_bad_steps` of them in a row stop training with TrainingStopped, the last good
checkpoint intact.

Under torchrun the same loop runs on every rank (`LoopConfig.parallel`, seekforge.parallel): the trainer's model
is sharded (FSDP2) in `optimize`, the bad-step guard and the gradient norm are global so that all ranks step or
skip together, checkpoints are written by every rank (torch.distributed.checkpoint shards: a run resumes under
any layout, one process included), and rank 0 alone writes the config, metrics, progress bar and report. With
one process none of this runs.

`Loop.step` is the number of updates done (what checkpoints are saved under); the step a task is asked
for is that count before the update, so step k (0-based) is the (k+1)-th update. Records are labelled in
one of two layouts, which readers of existing runs rely on:
- "index": a step's record carries its 0-based index, with its evaluation merged into it (pretraining, SFT);
- "count": a step's record carries the number of updates done; evaluations are records of their own
  (kind "eval"), step 0 the initial model's (GRPO).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from seekforge.configio import save_config, to_dict
from seekforge.errors import CheckpointError, ConfigError, SeekforgeError
from seekforge.parallel.config import ParallelConfig
from seekforge.parallel.grads import clip_grad_norm_
from seekforge.parallel.mesh import Mesh, is_main, setup
from seekforge.parallel.parallelize import parallelize
from seekforge.train.checkpoint import CheckpointManager, config_fingerprint, rng_state, set_rng_state
from seekforge.train.metrics import MetricsLogger, ProgressBar
from seekforge.train.optim import autocast_dtype, build_adamw, pick_device

NON_FINITE = "non-finite loss or gradients"  # the `reason` of a step the bad-step guard counts


class TrainingStopped(SeekforgeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the last good checkpoint stays."""


@dataclass
class LoopConfig:
    """The loop's settings, the base of every trainer's config; a trainer's config may set other defaults."""

    NAME: ClassVar[str] = "train"  # how errors name the config
    # what may change across a resume (cadence, presentation, where it runs); the rest is fingerprinted
    RESUME_FREE: ClassVar[frozenset] = frozenset({"eval_every", "save_every", "keep_last", "max_bad_steps", "device",
                                                  "progress", "tensorboard", "parallel"})

    steps: int = 1000  # optimizer updates (GRPO: rollout + update steps)
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 3  # checkpoints kept
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    progress: bool = True
    tensorboard: bool = True
    # the layout of ranks under torchrun (seekforge.parallel): how the run is spread, never what it computes, so a
    # resume may change it (the checkpoint reshards)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for key in ("steps", "eval_every", "save_every", "keep_last", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.NAME} config: {key} must be >= 1, got {getattr(self, key)}")

    def resume_free(self) -> set[str]:
        """The fields a resume may change (RESUME_FREE, plus what a trainer's config adds)."""
        return set(self.RESUME_FREE)

    def fingerprint(self) -> str:
        """What must not change across a resume: every field but `resume_free()`."""
        free = self.resume_free()
        return config_fingerprint({k: v for k, v in to_dict(self).items() if k not in free})


class Task(Protocol):
    """What a trainer supplies to the loop."""

    step: int  # updates done so far: the loop's count (Trainer.step reads Loop.step)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def train_step(self) -> dict:
        """One update (the one at 0-based index `step`); its metrics record (`skipped`, with `reason`, when
        none was made)."""

    def evaluate(self) -> dict:
        """Held-out metrics of the current model."""

    def state_dict(self) -> dict:
        """Everything exact resume needs besides the model, the optimizer, the step and the RNG state (the data
        position): plain values, rank 0's."""

    def load_state_dict(self, state: dict) -> None: ...

    def shards(self, saved: set[str] | None = None) -> dict:
        """The model's and the optimizer's state, sharded as the run holds them (`Trainer.shards`); with `saved`,
        the keys of a checkpoint about to be loaded into it."""

    def load_shards(self, shards: dict) -> None: ...

    def export(self) -> Path:
        """The final model (Hugging Face layout, with its tokenizer) under DIR/final."""


class Loop:
    """The run directory, checkpoints, metrics and the step loop of one run (see the module doc).

    `cfg` is a LoopConfig with a fingerprint() (what a resume must match); it is saved as DIR/`config_file`.
    In a distributed run every rank runs the loop; rank 0 alone writes the config, metrics and progress.
    """

    def __init__(self, cfg: LoopConfig, out_dir: str | Path, config_file: str, resume: bool = False,
                 records: Literal["index", "count"] = "index", desc: str = "train"):
        self.cfg, self.out, self.records, self.desc = cfg, Path(out_dir), records, desc
        self.resume = resume
        self.main = is_main()
        self.ckpt = CheckpointManager(self.out, keep_last=cfg.keep_last, fingerprint=cfg.fingerprint())
        if self.ckpt.latest_dir() is not None and not resume:
            raise ConfigError(f"{self.out} already holds a training run; pass --resume to continue it or "
                              f"choose a new --out directory")
        if resume:
            self.ckpt.verify_fingerprint(cfg.fingerprint())
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / config_file)
        self.step = 0
        self.metrics: MetricsLogger | None = None

    def _label(self, done: int) -> int:
        """The record step of the update that brought the count to `done`."""
        return done - 1 if self.records == "index" else done

    def start(self, task: Task, map_location="cpu") -> None:
        """Restore the latest checkpoint when resuming, then open the metrics log (dropping records a killed run
        wrote after that checkpoint). Call once the task's model, optimizer and data are built."""
        loaded = self.ckpt.load_latest(map_location=map_location) if self.resume else None
        if loaded is not None:
            state = loaded[1]
            if "model" in state:  # format 1: a single-process run's checkpoint, everything in state.pt
                if dist.is_initialized():
                    raise CheckpointError(f"{self.ckpt.latest_dir()} was saved by a single process in the format "
                                          f"before sharded checkpoints; resume it with one process (its next "
                                          f"checkpoint then resumes under any layout)")
                task.model.load_state_dict(state["model"])
                task.optimizer.load_state_dict(state["optimizer"])
            else:
                shards = task.shards(saved=self.ckpt.shard_keys())
                self.ckpt.load_shards(shards)
                task.load_shards(shards)
            task.load_state_dict(state)
            ranks = state.get("rng_ranks", [])
            set_rng_state(ranks[dist.get_rank()] if dist.is_initialized() and len(ranks) == dist.get_world_size()
                          else state["rng"])
            self.step = int(state["step"])
        # a fresh start (no checkpoint) drops whatever a run killed before its first checkpoint logged
        if self.main:
            self.metrics = MetricsLogger(self.out, tensorboard=self.cfg.tensorboard,
                                         resume_step=self._label(self.step) if loaded is not None else -1)

    def save(self, task: Task) -> None:
        """A checkpoint of the step (a collective in a distributed run: every rank writes its shards). Each rank's
        RNG state is kept; a resume under another number of ranks restores rank 0's on every rank."""
        state = {**task.state_dict(), "rng": rng_state(), "step": self.step}
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state["rng"])
            state["rng_ranks"] = ranks
        self.ckpt.save(self.step, state, shards=task.shards())

    def _log(self, step: int, record: dict, **values) -> None:
        if self.metrics is not None:
            self.metrics.log(step, record, **values)

    def run(self, task: Task) -> dict:
        """Train until cfg.steps updates are done; returns the last step's record (with its evaluation)."""
        cfg, log = self.cfg, self._log
        last: dict = {}
        bad = 0
        try:
            if self.records == "count" and self.step == 0:
                log(0, task.evaluate(), kind="eval")
            with ProgressBar(cfg.steps, start_step=self.step, desc=self.desc,
                             disable=not (cfg.progress and self.main)) as bar:
                while self.step < cfg.steps:
                    record = task.train_step()
                    self.step += 1
                    label = self._label(self.step)
                    failed = record.get("skipped") and record.get("reason") == NON_FINITE
                    bad = bad + 1 if failed else 0
                    if failed:
                        if self.main:
                            bar.write(f"step {label}: {NON_FINITE}, step skipped ({bad} in a row)")
                        if bad >= cfg.max_bad_steps:
                            log(label, record)
                            raise TrainingStopped(
                                f"{bad} non-finite steps in a row at step {label}; stopped. The last good checkpoint "
                                f"in {self.ckpt.dir} is intact: lower lr or check the data, then resume")
                    due_eval = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                    evaluation = task.evaluate() if due_eval else {}
                    if self.records == "index":
                        record.update(evaluation)
                        last = record
                    log(label, record)
                    if self.records == "count":
                        last = record
                        if due_eval:
                            log(label, evaluation, kind="eval")
                            last = {**record, **{f"eval_{k}": v for k, v in evaluation.items()}}
                    bar.update(self.step, loss=record.get("loss"), lr=record.get("lr"),
                               tokens_per_s=record.get("tokens_per_s", record.get("rollout_tokens_per_s")))
                    if (self.step % cfg.save_every == 0 or self.step == cfg.steps) and not failed:
                        self.save(task)  # never in the middle of a bad streak
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return last


class Trainer:
    """What every trainer shares around its loop (see the module doc). A subclass builds its data and model,
    hands the model to `optimize`, then calls `self.loop.start(self)`; its `train_step` makes one update
    through `apply_update`.

    Under torchrun (more than one process) the trainer joins the process group and builds the meshes of
    cfg.parallel (`seekforge.parallel`); `optimize` then shards the model (FSDP2), and what a trainer reduces
    over the data it reduces over `mesh`'s data-parallel ranks. With one process `mesh` is None and nothing of
    this runs."""

    cfg: LoopConfig  # with the optimizer's fields: lr, weight_decay, beta1, beta2, grad_clip, and schedule()
    model: torch.nn.Module
    mesh: Mesh | None  # the meshes of a distributed run; None in a single process

    def __init__(self, cfg: LoopConfig, out_dir: str | Path, config_file: str, resume: bool = False,
                 records: Literal["index", "count"] = "index", desc: str = "train"):
        self.cfg, self.out = cfg, Path(out_dir)
        self.layout, self.device, self.mesh = setup(cfg.parallel, pick_device(cfg.device))
        self.amp = autocast_dtype(self.device, cfg.precision)
        self.loop = Loop(cfg, self.out, config_file, resume=resume, records=records, desc=desc)
        self.ckpt = self.loop.ckpt

    @property
    def step(self) -> int:
        """Updates done so far: the loop's count."""
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files: rank 0, or the only process."""
        return self.loop.main

    def optimize(self, model: torch.nn.Module, compile: bool = False) -> None:
        """Train `model`: parallelised by cfg.parallel (activation checkpointing, torch.compile per block with
        `compile`, FSDP2 over the data-parallel ranks), then AdamW over it and the config's learning-rate
        schedule."""
        cfg = self.cfg
        self.model = parallelize(model, self.mesh, self.layout, compute_dtype=self.amp, compile=compile)
        self.optimizer = build_adamw(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.schedule = cfg.schedule()

    def shards(self, saved: set[str] | None = None) -> dict:
        """The model's and the optimizer's state as torch.distributed.checkpoint saves it (parameter names for
        keys, DTensors where sharded), for checkpoints that any layout resumes. To load a checkpoint holding the
        keys `saved`: a parameter the optimizer had no state for when it was saved (it had no gradient yet, e.g.
        MTP's under mtp_weight 0) is left without one, as in the run that saved it."""
        model, optimizer = get_state_dict(self.model, self.optimizer)
        if saved is not None:
            stateful = {key.rsplit(".", 1)[0] for key in saved if key.startswith("optimizer.state.")}
            optimizer["state"] = {name: value for name, value in optimizer["state"].items()
                                  if f"optimizer.state.{name}" in stateful}
        return {"model": model, "optimizer": optimizer}

    def load_shards(self, shards: dict) -> None:
        # not strict: parameters without optimizer state stay so (`shards`); the model's keys are all there, as
        # torch.distributed.checkpoint refuses a checkpoint that lacks one of them
        set_state_dict(self.model, self.optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"], options=StateDictOptions(strict=False))

    def autocast(self, cache: bool = True):
        """The training precision (autocast, or nothing in fp32); `cache=False` without autocast's weight-cast
        cache, which would keep a cast of the weights from before the latest update."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp, cache_enabled=cache)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether `loss` is finite on every rank, so that all ranks run the backward (FSDP2's collectives) or
        none does."""
        finite = bool(torch.isfinite(loss))
        return finite if self.mesh is None else self.mesh.all_true(finite, self.device)

    def apply_update(self, losses: Iterable[torch.Tensor]) -> float:
        """One optimizer update: backward each loss `losses` yields (a generator may read its statistics after
        the yield, once the backward ran), clip the gradients to cfg.grad_clip, step. Returns the gradient norm
        before clipping; NaN when the update was dropped by the bad-step guard: a non-finite loss (the losses
        after it are not run) or gradient norm zeroes the gradients and takes no step, and the trainer returns
        a record with `skipped` and `reason` = NON_FINITE. In a distributed run the norm is global and a loss
        that is not finite on one rank counts on every rank: all ranks step or skip together."""
        finite = True
        for loss in losses:
            if not self.all_finite(loss):
                finite = False
                break
            loss.backward()
        return self.finish_update(finite)

    def finish_update(self, finite: bool) -> float:
        """The end of an update whose backward ran (`finite`: its losses were finite on every rank): clip the
        gradients to cfg.grad_clip (the norm over every rank's parameters, pipeline stages included) and step, or
        drop the update as `apply_update` says. Returns the gradient norm before clipping, NaN when dropped."""
        pp = self.mesh.dense["pp"].get_group() if self.layout.pp > 1 else None
        grad_norm = (clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, group=pp, device=self.device)
                     if finite else math.nan)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train(self) -> dict:
        """Train to cfg.steps; returns the last step's record."""
        return self.loop.run(self)

    def run(self, report: bool = True) -> dict:
        """Train to the end, export DIR/final and (with `report`) write the report card; the last record."""
        last = self.train()
        self.export()
        if report and self.main:
            from seekforge.train.report import write_report

            write_report(self.out)
        return last
