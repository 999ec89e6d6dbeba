"""GRPO with mixed rewards: rule rewards for one task, the reward model for another, in one run."""

import json
import math

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.rl.grpo import GRPOTrainer, load_grpo_config
from seekforge.rl.mixture import allocate
from seekforge.rl.rollout import Completion, Rollouts
from seekforge.tasks import get_task, r1_zero_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_model(tiny_checkpoint, task_tokenizer, tmp_path_factory):
    """A reward model (random score head) on the tiny checkpoint's backbone, with its tokenizer."""
    from seekforge.model.reward import load_reward_model

    path = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(0)
    load_reward_model(tiny_checkpoint(), pad_id=task_tokenizer.pad_id).save_pretrained(path)
    task_tokenizer.save_pretrained(path)
    return path


def _config(base, rm, *extra):
    tasks = ("[{task: chain_sum, rewards: [accuracy, format], reward_weights: [1.0, 0.5]}, "
             "{task: chain_sum, label: open, rewards: [reward_model, format], reward_weights: [2.0, 0.25]}]")
    return load_grpo_config(None, [
        f"init_from={base}", f"tasks={tasks}", f"reward_model.path={rm}", "steps=2", "prompts_per_step=2",
        "group_size=3", "max_tokens=8", "lr=1e-3", "mask_truncated=false", "eval_every=100", "eval_n=2",
        "save_every=1", "micro_batch_size=4", "progress=false", "tensorboard=false", *extra])


def test_prompts_split_by_share():
    assert allocate(16, [1.0, 1.0]) == [8, 8]
    assert allocate(5, [1.0, 1.0]) == [3, 2]
    assert allocate(10, [3.0, 1.0, 1.0]) == [6, 2, 2]
    assert allocate(1, [1.0, 3.0]) == [0, 1]


def test_mixed_group_advantages_by_hand(tiny_checkpoint, reward_model, tmp_path):
    """Group 0 (rules: accuracy 1.0 + format 0.5), group 1 (the reward model 2.0 + format 0.25): each group's total
    is its own task's weighted sum (format counts 0.5 in one, 0.25 in the other), normalised within the group; the
    reward model scores its group's completions in one call."""
    trainer = GRPOTrainer(_config(tiny_checkpoint(), reward_model), tmp_path / "run")
    calls = []

    class Stub:
        def score(self, prompts, responses):
            calls.append(list(responses))
            return [0.2, -0.4, 1.1]

    trainer.reward_model = Stub()
    rows = get_task("chain_sum").rows("train", 2, 0)
    answer = rows[0].answer
    texts = [[f" 1 + 2 </think> <answer>{answer}</answer>",  # right, well formed: 1 + 0.5
              " 1 + 2 </think> <answer>-1</answer>",  # wrong, well formed: 0 + 0.5
              f" 1 + 2 <answer>{answer}</answer>"],  # right, malformed: 1 + 0
             [" 1 </think> <answer>3</answer>", "bb", "ccc"]]  # well formed, malformed, malformed
    prompts = [r1_zero_prompt(r.prompt) for r in rows]
    groups = [[Completion(i, [5] * (j + 1), t, False) for j, t in enumerate(g)] for i, g in enumerate(texts)]
    r = Rollouts(rows, prompts, [[1, 2]] * 2, groups, 0.0, 0)
    trainer._score(r, [0, 1])
    assert calls == [texts[1]]
    per_fn, totals = trainer._totals(r, [0, 1])
    assert trainer.reward_names == ["accuracy", "format", "reward_model"]
    nan = math.nan
    torch.testing.assert_close(per_fn, torch.tensor([[[1, 1, nan], [0, 1, nan], [1, 0, nan]],
                                                     [[nan, 1, 0.2], [nan, 0, -0.4], [nan, 0, 1.1]]],
                                                    dtype=torch.float64), equal_nan=True)
    seqs = trainer._sequences([[(r, per_fn, totals)]])  # one rank's kept parts
    # group 0: totals 1.5, 0.5, 1.0: mean 1, sample std 0.5
    # group 1: totals 2 * 0.2 + 0.25 = 0.65, -0.8, 2.2: mean 2.05 / 3, deviations -0.1 / 3, -4.45 / 3, 4.55 / 3,
    # sample std sqrt((0.01 + 19.8025 + 20.7025) / 9 / 2) = sqrt(40.515 / 18)
    eps = 1e-4
    std1 = math.sqrt(40.515 / 18)
    by_hand = [0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.0,
               -0.1 / 3 / (std1 + eps), -4.45 / 3 / (std1 + eps), 4.55 / 3 / (std1 + eps)]
    torch.testing.assert_close(seqs.advantages, torch.tensor(by_hand), atol=1e-5, rtol=0)


def test_mixed_run_scores_with_the_reward_model_in_process_and_resumes(tiny_checkpoint, reward_model, tmp_path):
    cfg = _config(tiny_checkpoint(), reward_model)
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") != "eval"][-1]
    assert last["step"] == 2 and math.isfinite(last["reward_reward_model"]) and "accuracy" in last
    state = trainer.state_dict()
    assert state["prompts"] == {"cursor": 2} and state["task_prompts"] == {"open": {"cursor": 2}}
    again = GRPOTrainer(cfg, tmp_path / "run", resume=True)  # restores every task's place in its prompts
    assert again.step == 2 and [p.cursor for p in again.prompts] == [2, 2]


def test_mixed_configs_are_checked(tiny_checkpoint, reward_model):
    base = tiny_checkpoint()
    with pytest.raises(ConfigError, match="no reward model"):
        load_grpo_config(None, [f"init_from={base}", "tasks=[{task: chain_sum, rewards: reward_model}]"])
    with pytest.raises(ConfigError, match="distinct labels"):
        load_grpo_config(None, [f"init_from={base}", "tasks=[{task: chain_sum}, {task: chain_sum}]"])
    with pytest.raises(ConfigError, match="one weight per reward"):
        load_grpo_config(None, [f"init_from={base}", "tasks=[{task: chain_sum, reward_weights: [1.0]}]"])
    with pytest.raises(ConfigError, match="not both"):
        load_grpo_config(None, [f"init_from={base}", f"reward_model.path={reward_model}", "reward_model.url=http://x"])


def test_grpo_command_needs_a_task_or_tasks(tiny_checkpoint, tmp_path, capsys):
    from seekforge.cli import main

    assert main(["grpo", "--from", str(tiny_checkpoint()), "--out", str(tmp_path / "x")]) == 2
    assert "--task NAME" in capsys.readouterr().err


def test_http_endpoint_scores_as_the_in_process_model(reward_model):
    import threading
    import urllib.error
    import urllib.request

    from seekforge.rl.reward_model import HTTPRewardModel, LocalRewardModel, reward_server

    local = LocalRewardModel(reward_model, batch_size=2)
    server = reward_server(local, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/rewards"
        prompts = [r1_zero_prompt("What is 1 + 2?")] * 3
        responses = [" 3 </think> <answer>3</answer>", " 4", " a longer response than the others </think>"]
        remote = HTTPRewardModel(url).score(prompts, responses)
        # the in-process scores, one sequence at a time (no batching, no padding) as the reference
        from seekforge.train.reward import encode_response

        alone = [float(local.model(torch.tensor([encode_response(local.tokenizer, p, r)])))
                 for p, r in zip(prompts, responses)]
        assert remote == pytest.approx(alone, abs=1e-5)
        bad = urllib.request.Request(url, data=b'{"prompts": ["a"]}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad)
        assert err.value.code == 400
    finally:
        server.shutdown()
        server.server_close()
