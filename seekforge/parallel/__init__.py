"""Distributed training on PyTorch's own stack, applied to the model from outside it.

- pipeline.py: pipeline parallelism of the Transformer on torch.distributed.pipelining (`PipelineModel`), and
  the stage split the planner shares (`stage_split`).

May import seekforge.errors, configio and model; never train, rl or the engine. This package imports nothing."""
