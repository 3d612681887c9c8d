"""PPO's arithmetic against numbers worked out by hand (the working is in the comments)."""

import math

import pytest
import torch

from align import AlignError
from align.rl import kl
from align.rl.losses import (
    RunningMoments, entropy_from_logits, explained_variance, gae, last_token_index, masked_mean, masked_var,
    masked_whiten, per_token_rewards, policy_loss, shape_scores, value_loss,
)
from align.rl.reward import SCORE_KEY, pool_index
from align.rl.rollout import prompt_batch, truncate_after_eos


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def approx(x, expected, tol=1e-5):
    """Element-wise closeness of a tensor (any shape) to the expected numbers (nested lists allowed)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten().tolist()
    return x == pytest.approx(torch.tensor(expected, dtype=torch.float64).flatten().tolist(), abs=tol)


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_masked_entries():
    x, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    assert approx(masked_mean(x, mask), 2.0)  # (1 + 2 + 3) / 3
    # deviations -1, 0, 1: population variance 2/3, unbiased 2/2 = 1
    assert approx(masked_var(x, mask, unbiased=False), 2 / 3)
    assert approx(masked_var(x, mask), 1.0)
    assert approx(masked_mean(x, mask, dim=1), [2.0])


def test_masked_whiten():
    x, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    assert approx(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])  # mean 2, std 1; masked entry -> 0
    # 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> -1, 0, 1; keeping the mean -> 3, 4, 5
    y, full = t([2, 4, 6]), t([1, 1, 1])
    assert approx(masked_whiten(y, full), [[-1.0, 0.0, 1.0]])
    assert approx(masked_whiten(y, full, shift_mean=False), [[3.0, 4.0, 5.0]])


def test_whiten_per_sequence_weighs_a_short_response_like_a_long_one():
    # a 3-token response with advantage 1 and a 1-token one with -1
    x = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # per token: mean 0.5, unbiased var 1 -> the long one barely positive, the short one far below
    assert approx(masked_whiten(x, mask), [[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]])
    # per sequence: mean 0, var (1 + 1) / 1 over 2 responses -> +-1/sqrt(2), symmetric
    r = 2 ** -0.5
    per_seq = masked_whiten(x, mask, weights=mask / mask.sum(-1, keepdim=True))
    assert approx(per_seq, [[r, r, r], [-r, 0.0, 0.0]])


def test_running_moments_merge_batches():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (m.mean, m.count) == (2.0, 3) and m.var == pytest.approx(2 / 3)
    m.update(torch.tensor([4.0, 5.0]))
    # the same as 1..5 at once: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert (m.mean, m.var, m.count) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    assert approx(m.normalize(torch.tensor([3.0 + math.sqrt(2)])), [1.0])


# --- rewards -------------------------------------------------------------------------------------


def test_kl_estimators_per_token():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    # k1 = logp - ref = 1, -1
    assert approx(kl.k1(logp, ref), [1.0, -1.0])
    # k2 = (ref - logp)^2 / 2 = 0.5 both
    assert approx(kl.k2(logp, ref), [0.5, 0.5])
    # k3 = (r - 1) - log r with log r = ref - logp: log r = -1 -> e^-1 - 1 + 1 = 0.367879;
    #                                              log r = +1 -> e - 1 - 1 = 0.718282
    assert approx(kl.k3(logp, ref), [0.367879, 0.718282])
    assert approx(kl.estimate(logp, logp, "k3"), [0.0, 0.0])
    with pytest.raises(AlignError, match="k1"):
        kl.estimate(logp, ref, "k4")


def test_adaptive_kl_controller():
    c = kl.AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(9.0, n_steps=100)  # error 9/6 - 1 = 0.5 -> clipped to 0.2: beta *= 1 + 0.2 * 100 / 10000
    assert c.value == pytest.approx(0.1002)
    c.update(5.4, n_steps=100)  # error 5.4/6 - 1 = -0.1: beta *= 1 - 0.1 * 0.01
    assert c.value == pytest.approx(0.1000998)
    c.update(6.0, n_steps=100)  # on target: unchanged
    assert c.value == pytest.approx(0.1000998)
    low = kl.AdaptiveKL(0.1, 6.0, 10000)
    low.update(0.0, n_steps=100)  # error -1 -> clipped to -0.2: beta *= 0.998
    assert low.value == pytest.approx(0.0998)
    fixed = kl.FixedKL(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def test_per_token_rewards_put_score_on_last_token():
    # response of 2 tokens (third is padding), beta 0.1, k1: kl = (-1 - -1.5, -2 - -2) = (0.5, 0)
    logp, ref, mask = t([-1.0, -2.0, -3.0]), t([-1.5, -2.0, -2.0]), t([1, 1, 0])
    rewards, kls = per_token_rewards(torch.tensor([2.0]), logp, ref, mask, beta=0.1, estimator="k1")
    assert approx(kls, [[0.5, 0.0, 0.0]])
    assert approx(rewards, [[-0.05, 2.0, 0.0]])  # -0.1 * 0.5; the score 2.0 at the last real token


def test_score_normalisation_then_missing_eos_penalty():
    m = RunningMoments(mean=1.0, var=4.0, count=10)
    out = shape_scores(torch.tensor([3.0, 3.0]), torch.tensor([True, False]), m, missing_eos_penalty=0.5)
    assert approx(out, [1.0, 0.5])  # (3 - 1) / 2 = 1; without EOS 1 - 0.5
    raw = shape_scores(torch.tensor([3.0]), torch.tensor([False]), None, None)
    assert approx(raw, [3.0])
    # ppo.rm_weight scales the normalised score, not the EOS penalty; at 0 only the penalty is left
    assert approx(shape_scores(torch.tensor([3.0, 3.0]), torch.tensor([True, False]), m, 0.5, weight=0.5),
                  [0.5, 0.0])
    assert approx(shape_scores(torch.tensor([3.0, 3.0]), torch.tensor([True, False]), m, 0.5, weight=0.0),
                  [0.0, -0.5])


# --- GAE -----------------------------------------------------------------------------------------


def test_gae_hand_computed():
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1 - 0.7 = 0.3                    A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1              A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1              A0 = 0.1 + 0.95 * 0.385 = 0.46575
    assert approx(adv, [[0.46575, 0.385, 0.3]])
    assert approx(ret, [[0.96575, 0.985, 1.0]])  # A + V
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: 0.3; t=1: delta = 0.9 * 0.7 - 0.6 = 0.03, A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04, A0 = 0.04 + 0.72 * 0.246 = 0.21712
    assert approx(adv, [[0.21712, 0.246, 0.3]])


def test_gae_treats_padding_as_terminal():
    # the garbage value 9.9 and reward 5 after the EOS must not leak back
    rewards, values, mask = t([0.0, 1.0, 5.0]), t([0.2, 0.4, 9.9]), t([1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t=1: delta = 1 + 0 - 0.4 = 0.6 -> A1 = 0.6; t=0: delta = 0 + 0.4 - 0.2 = 0.2 -> A0 = 0.2 + 0.6 = 0.8
    assert approx(adv, [[0.8, 0.6, 0.0]])
    assert approx(ret, [[1.0, 1.0, 0.0]])


# --- losses and statistics -----------------------------------------------------------------------


def test_clipped_policy_loss():
    old = t([-1.0, -1.0, -1.0])
    logp = old + torch.log(t([1.5, 0.5, 0.9]))  # ratios 1.5, 0.5, 0.9
    adv, mask = t([1.0, -1.0, 1.0]), t([1, 1, 1])
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped);
    # token 3: max(-0.9, -0.9) = -0.9 (inside the range). mean = -1.3 / 3
    assert loss.item() == pytest.approx(-0.433333, abs=1e-5)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    # approx KL = mean(log(r)^2) / 2 = (0.164402 + 0.480453 + 0.011101) / 3 / 2
    assert stats["approxkl"] == pytest.approx(0.109326, abs=1e-5)


def test_clipped_value_loss():
    loss, stats = value_loss(t([0.5]), t([0.0]), t([1.0]), t([1]), cliprange_value=0.2)
    # unclipped (0.5 - 1)^2 = 0.25; clipped to 0.2: (0.2 - 1)^2 = 0.64; 0.5 * max = 0.32
    assert loss.item() == pytest.approx(0.32)
    assert stats["value_clipfrac"] == 1.0


def test_entropy_and_explained_variance():
    assert approx(entropy_from_logits(t([0.0, 0.0])), [math.log(2)])
    # probs 1/4, 3/4: 0.25 ln 4 + 0.75 ln 4/3 = 0.562335
    assert approx(entropy_from_logits(t([0.0, math.log(3)])), [0.562335])
    # returns 1, 2, 4: var 7/3; residuals 0, 0, 1: var 1/3 -> 1 - 1/7
    ev = explained_variance(t([1.0, 2.0, 3.0]), t([1.0, 2.0, 4.0]), t([1, 1, 1]))
    assert ev == pytest.approx(6 / 7)


# --- rollouts and the reward model's reading position -------------------------------------------


def test_truncate_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    out, mask, has_eos = truncate_after_eos(ids, eos=[2], pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]  # the EOS is kept, the rest padded
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False]
    assert last_token_index(mask).tolist() == [1, 3]  # the EOS, or the final token without one


def test_pool_index_skips_pad_like_sequence_classifiers():
    # pad == EOS == 2 (SmolLM2): the score is read at the rightmost non-pad token
    ids = torch.tensor([[2, 5, 6, 2, 2], [2, 5, 6, 7, 198]])
    assert pool_index(ids, pad_id=2).tolist() == [2, 4]


def test_score_key_matches_peft_names():
    for key in ("base_model.model.score.weight", "base_model.model.score.modules_to_save.default.weight",
                "score.bias"):
        assert SCORE_KEY.search(key)
    assert not SCORE_KEY.search("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert not SCORE_KEY.search("base_model.model.scorer.weight")


def test_prompt_batches_cover_each_prompt_once_per_epoch_across_processes():
    prompts = list(range(8))
    seen = [p for update in range(2) for rank in range(2) for p in prompt_batch(prompts, update, 2, rank, 2, seed=3)]
    assert sorted(seen) == prompts
    assert prompt_batch(prompts, 5, 2, 1, 2, seed=3) == prompt_batch(prompts, 5, 2, 1, 2, seed=3)
