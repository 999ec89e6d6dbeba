"""Distributed training on PyTorch's own stack (torchrun, DeviceMesh, FSDP2, DTensor, torch.distributed.pipelining,
torch.distributed.checkpoint), applied to the model from outside it.

- config.py: `ParallelConfig`, the layout (dp_shard, dp_replicate, tp, ep, pp, activation checkpointing) and its
  checks against the world size and the model: one definition for training (`LoopConfig.parallel`) and the
  planner (seekforge.train.plan);
- mesh.py: the process group from torchrun's environment and the device meshes with their named dims;
- parallelize.py: `parallelize(model, mesh, layout)`: tensor and expert parallelism, pipeline stages, activation
  checkpointing, torch.compile and FSDP2 in torchtitan's order, and the model gathered for export;
- tensor.py: tensor parallelism (MLA split by heads, dense and shared-expert MLPs column/row-wise);
- expert.py: expert parallelism (routed experts placed across the ep ranks, tokens exchanged with all-to-all,
  the shared experts run during the dispatch);
- pipeline.py: pipeline parallelism (stages built from the model's own modules, torch's schedules, MTP on the
  last stage);
- compile.py: torch.compile per block; grads.py: gradient clipping over DTensors.

May import seekforge.errors, configio and model; never train, rl or the engine (the training loop builds on
this package). Import submodules directly; this package imports nothing."""
