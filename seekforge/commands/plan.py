"""`seekforge plan PRESET --gpus N --gpu-memory GB [key=value ...]`: per-GPU memory and per-step communication of a
parallel layout, computed from the model's shapes (arithmetic, not a measurement)."""

from __future__ import annotations

PRECISION_HELP = ("precision.params/grads/moments=fp32|bf16, precision.master=fp32|none; DeepSeek-V3: params bf16, "
                  "grads fp32, master fp32, moments bf16, zero=1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="size a distributed training run on paper: memory per GPU, communication per step",
        description="Per-GPU memory (parameters, gradients, optimizer states, activations) of the heaviest pipeline "
                    "stage and the bytes one GPU sends per step along each parallel dimension. Overrides: "
                    "parallel.dp_shard (-1: the rest), parallel.dp_replicate, parallel.tp, parallel.ep (carved out "
                    "of dp_shard), parallel.pp, parallel.activation_checkpointing=true|selective, zero=1|2|3, "
                    f"seq_len, micro_batch, micro_batches; {PRECISION_HELP}.")
    p.add_argument("--gpus", type=int, required=True, help="world size")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GB (1e9 bytes)")
    # the model and the overrides are one positional list (write them together, before or after the options)
    p.add_argument("model", nargs="+", metavar="MODEL [key=value ...]",
                   help="preset name (tiny, small, 16b, 236b, 671b) or checkpoint directory, then overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.configio import apply_overrides, from_dict
    from seekforge.errors import ConfigError
    from seekforge.model.config import ModelConfig
    from seekforge.train.plan import PlanConfig, plan

    if args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory must be positive, got {args.gpu_memory}")
    model, *overrides = args.model
    cfg = ModelConfig.load(model)
    config = from_dict(PlanConfig, apply_overrides(PlanConfig, {}, overrides), where="plan")
    out = plan(cfg, config, args.gpus)
    print(format_plan(cfg.name or model, config, out, args.gpus, args.gpu_memory))
    return 0


def format_plan(name, config, out, gpus: int, gpu_memory: float) -> str:
    from seekforge.train.plan import GB

    par, split, heavy = out["parallel"], out["split"], out["heaviest"]
    prec = config.precision
    checkpointing = {True: "on", False: "off"}.get(par.activation_checkpointing, par.activation_checkpointing)
    lines = [
        f"plan for {name} on {gpus} GPUs of {gpu_memory:g} GB (arithmetic from the shapes, not a measurement)",
        f"parameters {out['total_params'] / 1e9:.2f}B; dp_replicate={par.dp_replicate} dp_shard={par.dp_shard} "
        f"tp={par.tp} ep={par.ep} pp={par.pp}; ZeRO-{config.zero}; params {prec.params}, grads {prec.grads}, "
        f"master {prec.master}, moments {prec.moments}",
        f"seq_len {config.seq_len} x micro_batch {config.micro_batch}, {out['micro_batches']} micro-batches a step, "
        f"activation checkpointing {checkpointing}",
        f"blocks per stage (layers, then MTP): {', '.join(str(n) for n in split)}",
        "",
        f"memory per GPU, heaviest stage ({heavy.index}, {heavy.blocks} blocks):",
    ]
    for kind, nbytes in heavy.memory.items():
        lines.append(f"  {kind:<12} {nbytes / GB:9.2f} GB")
    total = sum(heavy.memory.values())
    left = gpu_memory - total / GB
    lines.append(f"  {'total':<12} {total / GB:9.2f} GB  ({'fits, ' + format(left, '.2f') + ' GB left' if left >= 0 else 'does NOT fit: ' + format(-left, '.2f') + ' GB over'})")
    lines += ["", "communication per step, bytes one GPU of that stage sends:"]
    for kind, nbytes in out["communication"].items():
        lines.append(f"  {kind:<32} {nbytes / GB:9.2f} GB")
    return "\n".join(lines)
