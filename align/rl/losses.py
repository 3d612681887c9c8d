"""PPO's tensor arithmetic: pure functions of tensors, no model, no config (tested by hand in tests/test_rl_math.py).

    masked statistics  -> masked_mean / masked_var / masked_whiten over response tokens, RunningMoments of scores
    rewards            -> shape_scores (normalise, weight, missing-EOS penalty), against_siblings (RLOO's baseline),
                          per_token_rewards (-beta * KL per token, the score at the last response token)
    advantages         -> gae (advantages and returns over response tokens)
    losses             -> policy_loss (clipped surrogate), value_loss (clipped), explained_variance

Shapes: B sequences, P prompt tokens (left padded), R response tokens (right padded). Masks are float
tensors of 1 (real response token) and 0 (padding after the first EOS).
"""

import math
from dataclasses import dataclass

import torch

from align.rl import kl as klmod

# ----------------------------------------------------------------------------------------------
# masked statistics over response tokens
# ----------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return torch.zeros_like(var)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; shift_mean=False keeps the mean (only rescales). `weights`
    (default: the mask) weigh the entries in the mean and variance, e.g. 1/length to weigh sequences equally."""
    w = mask if weights is None else weights
    mean, var = masked_mean(x, w), masked_var(x, w)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


@dataclass
class RunningMoments:
    """Running mean and (population) variance of reward-model scores, merged batch by batch (Chan et al.)."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = b_mean, b_var, n
            return
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


# ----------------------------------------------------------------------------------------------
# rewards, advantages, losses
# ----------------------------------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token (the EOS, or the final token when there is none)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def shape_scores(scores: torch.Tensor, has_eos: torch.Tensor, moments: RunningMoments | None,
                 missing_eos_penalty: float | None, weight: float = 1.0) -> torch.Tensor:
    """RM scores -> the scalar reward of each sequence: normalised by the running moments (if given,
    already updated with this batch) and weighted, then minus the penalty where the response never emitted EOS.
    The penalty is applied after normalisation, so it is in units of the score's standard deviation."""
    out = weight * (moments.normalize(scores) if moments is not None else scores)
    if missing_eos_penalty is not None:
        out = out - missing_eos_penalty * (~has_eos).to(out.dtype)
    return out


def against_siblings(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each response's score minus the mean of the other k-1 responses to its prompt (RLOO's baseline), for
    rollouts laid out as k consecutive samples per prompt. What a prompt earns whatever the response (an RM
    that likes its topic, a rule every sample meets) cancels; what differs between responses stays."""
    groups = scores.view(-1, k)
    others = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - others).flatten()


def per_token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """rewards[b, t] = -beta * kl[b, t], plus scores[b] at the last response token. Returns (rewards, kl)."""
    kl = klmod.estimate(logp, ref_logp, estimator) * mask
    rewards = -beta * kl
    idx = last_token_index(mask)
    rewards[torch.arange(len(scores)), idx] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. Masked positions (after the EOS) count as
    terminal: their value and reward are zero. Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (to minimise), with clip fraction and approx KL(old || new) = mean(logratio^2)/2."""
    logratio = logp - old_logp
    ratio = torch.exp(logratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss2 > loss1).float(), mask).item(),
            "approxkl": masked_mean(0.5 * logratio**2, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1, loss2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((loss2 > loss1).float(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)
