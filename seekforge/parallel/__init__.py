"""Distributed training on PyTorch's own stack, applied to the model from outside (DeviceMesh, DTensor,
FSDP2, pipelining): tensor.py holds tensor parallelism. May import seekforge.errors, configio and model."""
