"""GRPO under torchrun with data parallelism (FSDP2), on gloo ranks, against one process on the same global batch:
each rank samples its share of the step's groups with its own engine (a group's seed is its problem's place in the
prompt stream, so the groups are the same on any number of ranks), and the per-step losses, gradient norms, reward
metrics and the final weights are the one process's. Layouts other than data parallelism are refused."""

import json
from pathlib import Path

import pytest
import torch

from dist_harness import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
STEPS = 3
DIGITS = '''
def digits(prompt, completion, **kw):
    """A dense signal a random model gives: the share of digits in the completion."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)
'''
# the keys compared step by step: the update's (normalisers, gradient averaging) and the rollouts' (all-reduced)
KEYS = ("loss", "grad_norm", "clip_fraction", "entropy", "kl", "reward", "std_reward", "reward_digits",
        "completion_length", "sequences", "trained_sequences", "groups", "zero_std_groups")


def _grpo(out, base, rewards, overrides):
    """A GRPO run on this rank, exported to DIR/final; rank 0's records and the final weights whole (rank 0)."""
    from seekforge.parallel.parallelize import gathered
    from seekforge.rl.grpo import GRPOTrainer, load_grpo_config

    cfg = load_grpo_config(None, [
        f"init_from={base}", "task=chain_sum", f"steps={STEPS}", "prompts_per_step=5", "group_size=4",
        "max_tokens=10", "lr=1e-2", "mask_truncated=false", "eval_every=100", "eval_n=3", f"save_every={STEPS}",
        "micro_batch_size=3", f"rewards={rewards}:digits", "precision=fp32", "progress=false", "tensorboard=false",
        *overrides])
    trainer = GRPOTrainer(cfg, out)
    trainer.run(report=False)
    model = gathered(trainer.model, trainer.mesh)
    records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()] if trainer.main else []
    return {"records": [r for r in records if r.get("kind") != "eval"],
            "evals": [r for r in records if r.get("kind") == "eval"],
            "weights": None if model is None else {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.mark.parametrize("overrides", [
    ["loss_type=grpo"],
    # a token-mean normaliser over the whole step, the batch's reward std, old and reference log-probabilities
    ["loss_type=dapo", "scale_rewards=batch", "mu=2", "beta=0.05"],
    # two task sources in one run: their own prompt streams, rewards and weights, split 3:2 over each step
    ["tasks=[{task: chain_sum, rewards: 'DIGITS:digits'}, {task: chain_sum, label: terse, share: 0.67, "
     "knobs: {max_terms: 3}, rewards: ['DIGITS:digits', format], reward_weights: [1.0, 0.5]}]"],
], ids=["grpo", "dapo-batch-mu2-kl", "two-task-sources"])
def test_two_ranks_match_one_process(base, tmp_path, overrides):
    rewards = tmp_path / "digits.py"
    rewards.write_text(DIGITS)
    overrides = [o.replace("DIGITS", str(rewards)) for o in overrides]
    want = _grpo(tmp_path / "one", base, rewards, overrides)
    got = run_ranks(_grpo, 2, out=tmp_path / "two", base=base, rewards=rewards,
                    overrides=[*overrides, "parallel.dp_shard=2"])[0]
    assert [r["step"] for r in got["records"]] == [r["step"] for r in want["records"]] == list(range(1, STEPS + 1))
    for a, b in zip(got["records"], want["records"]):
        assert not b["skipped"] and b["trained_sequences"] > 0
        for key in KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=1e-9), (b["step"], key)
    # the held-out evaluation, each rank judging its share of the problems, is the whole set's
    evaluated = ("step", "accuracy", "format", "completion_tokens", "truncated", "n")
    assert len(want["evals"]) == 2
    assert [{k: r[k] for k in evaluated} for r in got["evals"]] == [{k: r[k] for k in evaluated} for r in want["evals"]]
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        err = float((got["weights"][name] - w).norm() / w.norm().clamp(min=1e-12))
        assert err < RTOL, f"{name}: relative error {err:.2e}"
    assert (tmp_path / "two" / "checkpoints" / f"step_{STEPS:08d}" / "shards" / ".metadata").is_file()
    from seekforge.model.hf import from_pretrained

    exported = from_pretrained(tmp_path / "two" / "final", dtype=torch.float32).state_dict()
    for name, w in got["weights"].items():  # rank 0 exported the gathered policy
        assert torch.equal(exported[name], w), name


def _refused(out, base, overrides):
    from seekforge.rl.grpo import GRPOTrainer, load_grpo_config

    GRPOTrainer(load_grpo_config(None, [f"init_from={base}", "progress=false", "tensorboard=false", *overrides]), out)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.tp=2"], "parallel.tp=2"),
    (["parallel.dp_shard=2", "parallel.ep=2"], "parallel.ep=2"),
    (["parallel.pp=2"], "parallel.pp=2"),
], ids=["tp", "ep", "pp"])
def test_layouts_other_than_data_parallel_are_refused(base, tmp_path, overrides, named):
    with pytest.raises(AssertionError, match=rf"ConfigError: grpo under torchrun runs data parallelism only "
                                             rf"\(parallel.dp_shard, parallel.dp_replicate.*\); got {named}: set it"):
        run_ranks(_refused, 2, out=tmp_path / "run", base=base, overrides=overrides)


def test_torchrun_command_line_and_resume_in_one_process(base, tmp_path):
    """`torchrun --nproc-per-node 2 -m seekforge grpo ...` on gloo: one report of the run, from rank 0. Its
    checkpoint after step 1 (the ranks' shards) resumes in one process, whose step 2 is the 2-rank run's."""
    import os
    import shutil
    import subprocess
    import sys

    from dist_harness import free_port

    (tmp_path / "digits.py").write_text(DIGITS)
    run = tmp_path / "run"
    args = ["-m", "seekforge", "grpo", "--from", str(base), "--task", "chain_sum", "--out", str(run),
            f"rewards={tmp_path / 'digits.py'}:digits", "steps=2", "prompts_per_step=3", "group_size=3",
            "max_tokens=12", "mask_truncated=false", "lr=1e-2", "eval_n=2", "save_every=1", "progress=false",
            "tensorboard=false", "precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    proc = subprocess.run([*torchrun, *args, "parallel.dp_shard=2"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: reward") == 1

    def records():
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    two = records()
    assert [(r["step"], r.get("kind")) for r in two] == [(0, "eval"), (1, None), (2, None), (2, "eval")]
    assert all(r["groups"] == 3 and not r["skipped"] for r in two[1:3])
    assert (run / "final" / "model.safetensors").is_file() and (run / "report.md").is_file()
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = records()
    assert [(r["step"], r.get("kind")) for r in one] == [(r["step"], r.get("kind")) for r in two]
    for key in ("loss", "grad_norm", "reward", "completion_length"):
        assert one[2][key] == pytest.approx(two[2][key], rel=RTOL, abs=1e-7), key  # the loss at ratio 1 is ~0
