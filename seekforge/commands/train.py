"""`seekforge train --config FILE_OR_BUILTIN --out DIR [--resume] [key=value ...]`: pretraining."""

from __future__ import annotations

from seekforge.commands import add_run_arguments


def register(subparsers) -> None:
    from seekforge.train.pretrain import BUILTIN_CONFIGS

    p = subparsers.add_parser("train", help="pretrain a DeepSeek-style model (MLA + MoE + MTP)",
                              description=f"Built-in configs: {', '.join(BUILTIN_CONFIGS)}. Any field can be "
                                          f"overridden as key=value (e.g. steps=200 lr=1e-3). To continue from "
                                          f"a checkpoint with a longer context (YaRN): init_from=CKPT "
                                          f"model_overrides.rope_factor=4 model_overrides.original_seq_len=1024 "
                                          f"model_overrides.max_seq_len=4096 seq_len=4096; over a checkpoint, "
                                          f"model_overrides may change anything but the weights' shapes. On "
                                          f"several processes: torchrun --nproc-per-node N -m seekforge train ... "
                                          f"parallel.dp_shard=N (FSDP2; parallel.dp_replicate=R for HSDP, "
                                          f"parallel.activation_checkpointing=true); batch_size is the global "
                                          f"batch, the same for any N.")
    p.add_argument("--config", default="tiny", help="a built-in config name or a .yaml/.toml file")
    add_run_arguments(p, None)
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.parallel.mesh import is_main
    from seekforge.train.pretrain import load_train_config, run as train

    cfg = load_train_config(args.config, args.overrides)
    last = train(cfg, args.out, resume=args.resume)
    if is_main():  # under torchrun: rank 0 speaks for the run
        print(f"done: loss {last.get('loss', float('nan')):.4f}"
              + (f", eval loss {last['eval_loss']:.4f}, {last['eval_bpb']:.3f} bits/byte" if "eval_loss" in last else "")
              + f"; model in {args.out}/final, report in {args.out}/report.md")
    return 0
