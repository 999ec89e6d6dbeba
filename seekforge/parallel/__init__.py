"""Distributed training applied to the model from outside, on PyTorch's own stack (DeviceMesh, DTensor,
torch.distributed collectives). Imports the model and the errors, never the trainers. `expert`: expert
parallelism (routed experts placed across the ep ranks, tokens exchanged with all-to-all)."""
