"""The GRPO objective against values computed by hand: advantages, every loss mode, clipping, k3 KL."""

import math

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.rl.loss import (combine_rewards, group_advantages, groups_with_signal, k3_kl, policy_loss,
                                     token_entropy, token_logprobs)

nan = math.nan
CPU = torch.device("cpu")


def close(got, want, tol=1e-5):
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                          atol=tol, rtol=0, equal_nan=True), (got, want)


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5; sample std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    close(group_advantages(r, "group", eps=0.0), [[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]])
    close(group_advantages(r, "group"), [[0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)]])
    close(group_advantages(r, "none"), [[0.5, -0.5, -0.5, 0.5]])  # Dr. GRPO: no std


def test_batch_scaling_uses_the_std_of_every_reward():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # centred by group: [.5, -.5, -.5, .5] and zeros; std of [1,0,0,1,1,1,1,1]: mean .75,
    # sum of squares 6 * .0625 + 2 * .5625 = 1.5, over n - 1 = 7
    s = math.sqrt(1.5 / 7)
    close(group_advantages(r, "batch", eps=0.0), [[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], [0, 0, 0, 0]])


def test_unjudged_samples_leave_the_baseline_and_get_zero_advantage():
    r = torch.tensor([[1.0, nan, 0.0, 0.0]])
    # judged: 1, 0, 0 -> mean 1/3, centred 2/3, -1/3, -1/3, sample variance (4/9 + 1/9 + 1/9) / 2 = 1/3
    s = math.sqrt(1 / 3)
    close(group_advantages(r, "group", eps=0.0), [[(2 / 3) / s, 0.0, (-1 / 3) / s, (-1 / 3) / s]])
    assert not group_advantages(torch.tensor([[nan, 1.0, nan, nan]]), "group").isnan().any()


def test_all_equal_groups_give_zero_advantage_and_no_signal():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, nan], [nan, 1.0, nan]])
    assert group_advantages(r, "group")[:2].abs().sum() == 0
    assert groups_with_signal(r).tolist() == [False, False, True, False]


def test_combine_rewards_weights_and_exclusions():
    # accuracy [1, 0, None], format [1, 1, 1], weights 1 and 0.5: the third sample is excluded because
    # accuracy judged its siblings but not it
    per_fn = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [nan, 1.0]]])
    close(combine_rewards(per_fn, [1.0, 0.5]), [[1.5, 0.5, nan]])
    # a function that judged nobody in the group does not count there
    per_fn = torch.tensor([[[nan, 1.0], [nan, 0.0]], [[nan, nan], [nan, nan]]])
    out = combine_rewards(per_fn, [1.0, 0.5])
    close(out[0], [0.5, 0.0])
    assert out[1].isnan().all()


def test_unknown_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="group, batch, none"):
        group_advantages(torch.zeros(1, 2), "std")


# ------------------------------------------------------------------------------------------ the loss
# Two sequences, three completion positions (the last of sequence 1 is padding), eps 0.2 / 0.28:
#   seq 0, A = +1: ratios e^0.1 = 1.10517 (inside), e^-0.5 = 0.60653 (below 0.8 but A > 0: the
#     unclipped term is the smaller, no clipping), e^0.4 = 1.49182 (above 1.28 with A > 0: clipped to 1.28)
#     -> per-token losses -1.10517, -0.60653, -1.28
#   seq 1, A = -2: ratios 1 (loss 2), e^-0.3 = 0.74082 (below 0.8 with A < 0: clipped to 0.8, loss 1.6)
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.1, -1.5, -0.9], [-0.3, -0.9, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0])
SEQ0 = [-math.exp(0.1), -math.exp(-0.5), -1.28]
SEQ1 = [2.0, 1.6]


def _loss(loss_type, **kw):
    return policy_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type, eps_low=0.2, eps_high=0.28, **kw)


def test_grpo_loss_is_a_mean_of_sequence_means():
    out = _loss("grpo")
    close(out.loss, (sum(SEQ0) / 3 + sum(SEQ1) / 2) / 2)
    assert (out.clipped_low, out.clipped_high, out.tokens) == (1.0, 1.0, 5.0)


def test_dapo_loss_is_a_token_mean():
    close(_loss("dapo").loss, (sum(SEQ0) + sum(SEQ1)) / 5)


def test_bnpo_loss_is_a_token_mean_of_the_local_batch():
    # the whole batch: 5 real tokens (the padding of sequence 1 does not count)
    close(_loss("bnpo").loss, (sum(SEQ0) + sum(SEQ1)) / 5)
    # each sequence as its own micro-batch: its own token mean, whatever the full batch's counts say
    # (-1.10517 - 0.60653 - 1.28) / 3 = -0.99723 and (2 + 1.6) / 2 = 1.8
    for i, want in ((0, -0.997234), (1, 1.8)):
        got = policy_loss(LOGP[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], loss_type="bnpo", eps_low=0.2,
                          eps_high=0.28, num_sequences=2, num_tokens=5).loss
        close(got, want)


def test_dr_grpo_loss_divides_by_a_constant():
    close(_loss("dr_grpo", max_tokens=4).loss, (sum(SEQ0) + sum(SEQ1)) / (2 * 4))
    with pytest.raises(ValueError, match="max_tokens"):
        _loss("dr_grpo")
    with pytest.raises(ConfigError, match="grpo, bnpo, dapo, dr_grpo"):
        _loss("ppo")


def test_clipped_tokens_get_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    policy_loss(logp, OLD, ADV, MASK, loss_type="dapo", eps_low=0.2, eps_high=0.28).loss.backward()
    # d/dlogp of -A * ratio is -A * ratio; divided by the 5 tokens
    want = torch.tensor([[-math.exp(0.1), -math.exp(-0.5), 0.0], [2.0, 0.0, 0.0]]) / 5
    close(logp.grad, want)


def test_symmetric_clip_and_first_iteration_ratio_one():
    # mu = 1: old = logp, so every ratio is 1 and the loss is -mean(A) over tokens (dapo)
    out = policy_loss(LOGP, LOGP, ADV, MASK, loss_type="dapo")
    close(out.loss, -(1.0 * 3 - 2.0 * 2) / 5)
    assert out.clipped_low == out.clipped_high == 0
    # eps_high = eps_low = 0.2: the ratio e^0.1 stays inside, e^0.4 is clipped at 1.2
    out = policy_loss(LOGP, OLD, ADV, MASK, loss_type="dapo", eps_low=0.2, eps_high=0.2)
    close(out.loss, (-math.exp(0.1) - math.exp(-0.5) - 1.2 + 2.0 + 1.6) / 5)


def test_micro_batches_add_up_to_the_full_batch():
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        full = _loss(loss_type, max_tokens=4).loss
        parts = [policy_loss(LOGP[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], loss_type=loss_type,
                             eps_low=0.2, eps_high=0.28, max_tokens=4, num_sequences=2, num_tokens=5).loss
                 for i in range(2)]
        close(sum(parts), full)


def test_kl_term_by_hand():
    ref = LOGP + torch.tensor([[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0]])  # one token where ref = 2 pi
    out = policy_loss(LOGP, OLD, ADV, MASK, loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.1, ref_logp=ref)
    k3 = 2 - math.log(2) - 1  # exp(d) - d - 1 with d = log 2
    close(out.loss, (sum(SEQ0) + sum(SEQ1) + 0.1 * k3) / 5)
    close(out.kl, k3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(LOGP, OLD, ADV, MASK, beta=0.1)


# ------------------------------------------------------------------------------------------ k3, logprobs
def test_k3_by_hand_and_unbiased():
    # pi = 0.5, ref = 0.25: d = log(ref / pi) = log 0.5, k3 = 0.5 - log 0.5 - 1 = 0.193147
    close(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))), 0.193147, tol=1e-6)
    close(k3_kl(torch.tensor([-0.7]), torch.tensor([-0.7])), [0.0])
    # E_pi[k3] = sum_x pi(x) (ref/pi - log(ref/pi) - 1) = KL(pi || ref) exactly
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    expected = (pi * k3_kl(pi.log(), ref.log())).sum()
    close(expected, (pi * (pi / ref).log()).sum())
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_token_logprobs_and_entropy_match_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    dist = torch.distributions.Categorical(logits=logits)
    close(token_logprobs(logits, targets), dist.log_prob(targets))
    close(token_entropy(logits), dist.entropy())


def test_token_logprobs_under_the_sampling_distribution_by_hand():
    from seekforge.engine import SamplingParams
    from seekforge.engine.sampler import broadcast_batch

    # one position, vocabulary of 5, temperature 0.5: scaled logits [4, 2, 1, 0, -2]
    logits = torch.tensor([[[2.0, 1.0, 0.5, 0.0, -1.0]]])
    z = [4.0, 2.0, 1.0, 0.0, -2.0]

    def logp(token, **params):
        sampling = broadcast_batch(SamplingParams(temperature=0.5, **params), 5, CPU)
        return float(token_logprobs(logits, torch.tensor([[token]]), sampling))

    close(logp(1), 2 - math.log(sum(math.exp(v) for v in z)))  # temperature alone: softmax of logits / 0.5
    close(logp(2, top_k=3), 1 - math.log(math.exp(4) + math.exp(2) + math.exp(1)))
    # top-p 0.9: p0 = e^4 / (e^4 + e^2 + e^1 + 1 + e^-2) = 0.8292 is short of 0.9, p0 + p1 = 0.9415 is not:
    # the kept set is {0, 1}
    close(logp(1, top_p=0.9), 2 - math.log(math.exp(4) + math.exp(2)))
    # top-p 0.84 keeps {0, 1} too; after top-k 3 the renormalised p0 = e^4 / (e^4 + e^2 + e^1) = 0.8438
    # reaches 0.84 alone: {0}
    close(logp(0, top_p=0.84), 4 - math.log(math.exp(4) + math.exp(2)))
    close(logp(0, top_p=0.84, top_k=3), 0.0)
    # a target outside the kept set keeps its own mass: log(e^1 / (e^4 + e^2 + e^1)), not -inf
    close(logp(2, top_p=0.9), 1 - math.log(math.exp(4) + math.exp(2) + math.exp(1)))
    # gradients reach the logits through the processed distribution
    # (dropped tokens get none): d/dx of z1 - log(e^z0 + e^z1) with z = x / 0.5 is (-(1 - q), 1 - q) / 0.5
    x = logits.clone().requires_grad_(True)
    sampling = broadcast_batch(SamplingParams(temperature=0.5, top_p=0.9), 5, CPU)
    token_logprobs(x, torch.tensor([[1]]), sampling).sum().backward()
    q = math.exp(2) / (math.exp(4) + math.exp(2))
    close(x.grad, [[[-(1 - q) / 0.5, (1 - q) / 0.5, 0.0, 0.0, 0.0]]])
