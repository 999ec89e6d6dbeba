"""Training: the one training loop (loop.py) that every trainer runs, and what trainers share.

- loop.py: `LoopConfig` (steps, cadence, bad-step limit, seed, device, precision, logging, the resume
  fingerprint) and `Trainer`, the base every trainer subclasses: run directory, AdamW and LR schedule, the
  guarded update (bad-step guard), exact resume, metrics, evaluation and checkpoint cadence, export, report;
- lm.py: a language model under the DeepSeek-V3 recipe (MTP, balancing), given its data and loss: the trainer
  of pretraining (pretrain.py: the corpus) and SFT (sft.py: .jsonl examples, packing, logit distillation);
- reward.py: a reward model (the language model's backbone with a scalar head) on pairwise preferences
  (Bradley-Terry), on lm.py's trainer;
- the pieces: checkpoint.py, metrics.py, report.py (the run's plots and report.md), schedule.py, optim.py,
  balance.py, init_from.py, flops.py;
- context extension: extend.py (two-stage YaRN) and long_eval.py (perplexity by length, passkey retrieval);
- evaluation of a checkpoint: perplexity.py (text or prepared data, windows shared with long_eval) and
  lm_harness.py (lm-evaluation-harness tasks through its hf backend).

May import seekforge.errors, configio, fp8, model, parallel (distributed training), tokenizer, data and tasks
(long_eval's passkey probe); never the engine, the RL stages (seekforge.rl builds on this package) or the
commands. Import submodules directly; this package imports nothing, so that `seekforge` commands which do not
train start fast."""
