"""`seekforge rm train|eval`: a reward model trained on pairwise preferences (Bradley-Terry), and its accuracy."""

from __future__ import annotations

import json

from seekforge.commands import add_run_arguments

PAIRS = 'rows {"prompt", "chosen", "rejected"}: texts, or lists of chat messages (rendered by the chat template)'


def register(subparsers) -> None:
    p = subparsers.add_parser("rm", help="reward model: train on preference pairs, evaluate pairwise accuracy")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser(
        "train", help="train a reward model (a checkpoint's backbone + a scalar head) with the Bradley-Terry loss",
        description="Any RMConfig field can be set as key=value, e.g. steps=300 lr=1e-5 batch_size=32 seq_len=1024 "
                    "val_fraction=0.1. DIR/final holds the reward model in transformers' sequence-classification "
                    "layout (DeepseekV3ForSequenceClassification: score.weight, pad_token_id) with the tokenizer; "
                    "held-out pairwise accuracy is logged as eval_accuracy.")
    t.add_argument("--init-from", required=True, metavar="CKPT",
                   help="checkpoint (HF layout with its tokenizer) whose backbone the reward model starts from: a "
                        "language model, or a reward model to continue")
    t.add_argument("--data", required=True, metavar="FILE.jsonl", help=PAIRS)
    add_run_arguments(t, "RMConfig")
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="pairwise accuracy of a reward model on held-out pairs (JSON on stdout)")
    e.add_argument("model", metavar="RM", help="reward model directory (what `seekforge rm train` writes in DIR/final)")
    e.add_argument("--data", required=True, metavar="FILE.jsonl", help=PAIRS)
    e.add_argument("--max-len", type=int, default=4096, help="tokens scored per sequence (the last ones)")
    e.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=evaluate)
    s = sub.add_parser("serve", help="score responses over HTTP for GRPO (reward_model.url): POST /v1/rewards",
                       description='POST /v1/rewards {"prompts": [str], "responses": [str]} answers {"scores": '
                                   '[float]}; GET /health. GRPO reaches it with '
                                   'reward_model.url=http://HOST:PORT/v1/rewards.')
    s.add_argument("model", metavar="RM", help="reward model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001)
    s.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    s.add_argument("--max-len", type=int, default=2048, help="tokens scored per sequence (the last ones)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=serve)


def train(args) -> int:
    from seekforge.train.reward import load_rm_config, run

    cfg = load_rm_config(args.config, [f"init_from={args.init_from}", f"data={args.data}", *args.overrides])
    last = run(cfg, args.out, resume=args.resume)
    print(f"done: loss {last.get('loss', float('nan')):.4f}"
          + (f", held-out accuracy {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else "")
          + f"; reward model in {args.out}/final, report in {args.out}/report.md")
    return 0


def evaluate(args) -> int:
    from seekforge.train.reward import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.model, args.data, args.max_len, args.batch_size, args.device)))
    return 0


def serve(args) -> int:
    from seekforge.rl.reward_model import ROUTE, LocalRewardModel, reward_server
    from seekforge.train.optim import pick_device

    server = reward_server(LocalRewardModel(args.model, pick_device(args.device), args.batch_size, args.max_len),
                           args.host, args.port)
    host, port = server.server_address[:2]
    print(f"scoring at http://{host}:{port}{ROUTE}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
