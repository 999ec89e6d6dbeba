"""One pretraining step, checked by hand: gradient accumulation, gradient clipping, the MTP weight schedule,
the frozen balancing bias, and the sequence-wise balance loss against DeepSeek-V3's formula."""

import json

import pytest
import torch

from seekforge.model.transformer import sequence_balance_loss
from seekforge.train.lm import LMTrainer
from seekforge.train.pretrain import TrainConfig, build_trainer, load_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["seq_len=32", "batch_size=4", "steps=4", "warmup_steps=1", "constant_steps=1", "decay_steps=2",
         "precision=fp32", "progress=false", "tensorboard=false", "eval_every=100", "save_every=100",
         "model_overrides={dim: 64, inter_dim: 128, moe_inter_dim: 32, n_layers: 2}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from seekforge.data.corpus import build_builtin_dataset

    path = tmp_path_factory.mktemp("data")
    build_builtin_dataset(path, n_docs=200, seed=0, vocab_size=300, progress=False)
    return path


def _trainer(out, data, *extra) -> LMTrainer:
    cfg = load_train_config("tiny", [*SMALL, f"data={data}", f"tokenizer={data / 'tokenizer'}", *extra])
    return build_trainer(cfg, out)


def _record_grads(trainer: LMTrainer) -> list[list[torch.Tensor]]:
    """What the optimizer sees on each step (after accumulation and clipping), with the update itself done."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def _norm(grads: list[torch.Tensor]) -> float:
    """The global L2 norm, accumulated in fp64 (one fp32 sum over 250k squares drifts by ~1e-5)."""
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]).double()))


def test_accumulated_micro_batches_give_the_update_of_one_batch(tmp_path, data):
    whole = _trainer(tmp_path / "whole", data)
    batch = next(whole.loader)
    whole.loader = iter([batch])
    halves = _trainer(tmp_path / "halves", data, "batch_size=2", "grad_accum=2")
    halves.loader = iter([{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}])
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):  # one seed, one initialisation
        assert torch.equal(a, b)
    seen_whole, seen_halves = _record_grads(whole), _record_grads(halves)
    rec_whole, rec_halves = whole.train_step(), halves.train_step()

    assert rec_halves["loss"] == pytest.approx(rec_whole["loss"], rel=1e-5)
    assert rec_halves["mtp_loss"] == pytest.approx(rec_whole["mtp_loss"], rel=1e-5)
    assert rec_halves["expert_load"] == rec_whole["expert_load"]  # loads are summed over micro-batches
    assert rec_halves["grad_norm"] == pytest.approx(rec_whole["grad_norm"], rel=1e-5)
    # the gradients the optimizer steps on (its first AdamW step, about lr * sign(g), would amplify fp32
    # rounding in gradients near eps, so the parameters after it are no sharper a check)
    for g_whole, g_halves in zip(seen_whole[0], seen_halves[0], strict=True):
        torch.testing.assert_close(g_halves, g_whole, rtol=1e-4, atol=1e-7)
    for a, b in zip(whole.model.moe_layers().values(), halves.model.moe_layers().values()):
        assert torch.equal(a.gate.bias, b.gate.bias)  # the bias moved by the same summed load


def test_gradient_clipping_scales_to_max_norm_only_above_it(tmp_path, data):
    trainer = _trainer(tmp_path / "run", data, "grad_clip=1e9", "bias_update_speed=0")
    batch = next(trainer.loader)
    trainer.loader = iter([batch] * 3)
    seen = _record_grads(trainer)
    trainer.optimizer.step = lambda: seen.append([p.grad.detach().clone() for p in trainer.model.parameters()])
    raw = trainer.train_step()  # the same parameters and batch every call: the optimizer does not step
    norm = _norm(seen[0])
    assert raw["grad_norm"] == pytest.approx(norm, rel=1e-5)

    trainer.cfg.grad_clip = norm / 4
    above = trainer.train_step()
    assert above["grad_norm"] == pytest.approx(norm, rel=1e-5)  # logged: the norm before clipping
    assert _norm(seen[1]) == pytest.approx(norm / 4, rel=1e-5)
    for clipped, g in zip(seen[1], seen[0], strict=True):
        torch.testing.assert_close(clipped, g / 4, rtol=1e-5, atol=1e-9)

    trainer.cfg.grad_clip = norm * 4
    trainer.train_step()
    for kept, g in zip(seen[2], seen[0], strict=True):
        torch.testing.assert_close(kept, g, rtol=1e-5, atol=0)


def test_mtp_weight_schedule_and_bias_freeze_in_a_short_run(tmp_path, data):
    trainer = _trainer(tmp_path / "run", data, "mtp_weight=0.3", "mtp_weight_late=0.1", "mtp_switch_step=2",
                       "bias_freeze_step=2", "bias_update_speed=0.01")
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mtp_weight"] for r in rows] == [0.3, 0.3, 0.1, 0.1]
    for r in rows:  # the weight in force is the one the loss used
        assert r["loss"] == pytest.approx(r["main_loss"] + r["mtp_weight"] * r["mtp_loss"] + r["balance_loss"],
                                          rel=1e-6)
    bias = [r["expert_bias"] for r in rows]  # after each step's update
    assert bias[0] != [[0.0] * len(b) for b in bias[0]] and bias[1] != bias[0]  # moving while gamma > 0
    assert bias[3] == bias[2] == bias[1]  # frozen from step 2 on
    assert [m.gate.bias.tolist() for m in trainer.model.moe_layers().values()] == bias[1]


def test_mtp_weight_switches_at_two_thirds_by_default():
    cfg = TrainConfig(steps=30, warmup_steps=1, constant_steps=1, decay_steps=1)
    assert [cfg.mtp_lambda(s) for s in (0, 19, 20, 29)] == [0.3, 0.3, 0.1, 0.1]
    assert [cfg.gamma(s) for s in (0, 10**6)] == [0.001, 0.001]  # no freeze unless bias_freeze_step is set


def test_sequence_balance_loss_by_hand():
    # DeepSeek-V3, per sequence of T tokens with N_r routed experts of which K_r are chosen per token:
    # f_i = N_r / (K_r * T) * count_i, P_i = mean_t s_{i,t} / sum_j s_{j,t}, L = sum_i f_i * P_i (times alpha).
    scores = torch.tensor([
        [[0.8, 0.4, 0.2, 0.2], [0.1, 0.1, 0.2, 0.1]],  # normalised: [.5, .25, .125, .125], [.2, .2, .4, .2]
        [[0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]],  # normalised: 0.25 each
    ])
    indices = torch.tensor([[[0, 1], [2, 0]], [[0, 1], [2, 3]]])
    # sequence 0: counts [2, 1, 1, 0], N_r / (K_r T) = 4 / (2 * 2) = 1, so f = [2, 1, 1, 0];
    # P = [(.5 + .2) / 2, (.25 + .2) / 2, (.125 + .4) / 2, (.125 + .2) / 2] = [.35, .225, .2625, .1625];
    # L0 = 2 * .35 + .225 + .2625 = 1.1875. Sequence 1: f = [1, 1, 1, 1], P = .25 each, L1 = 1.
    # Averaged over the two sequences: 1.09375.
    assert float(sequence_balance_loss(scores, indices)) == pytest.approx(1.09375, rel=1e-6)
