"""Training: the pieces shared by pretraining, SFT, distillation and GRPO (schedules, checkpoints,
metrics) and the loops built on them. Import submodules directly; this package imports nothing so
that `seekforge` commands which do not train start fast."""
