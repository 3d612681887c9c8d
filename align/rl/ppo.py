"""PPO for chat models on ONE frozen base model, readable top to bottom.

    rollout  -> sample responses to a batch of prompts with the policy adapter (left-padded prompts)
    score    -> reward-model score of each response (adapter "reward" + its score head), old log-probs
                and values (adapter "policy" + value head), reference log-probs (adapter "ref")
    rewards  -> per token: -beta * KL(policy || ref), plus at the last response token the (normalised) score
                and rule_weight * the rule reward (scaled per behaviour) when one is given (RuleReward); with
                ppo.samples_per_prompt > 1, that sum minus its mean over the other samples of the same prompt
    GAE      -> advantages and returns over the response tokens, advantages whitened
    update   -> several epochs of shuffled minibatches: clipped policy surrogate + clipped value loss,
                gradient accumulation over micro-batches, gradient clipping
    log, checkpoint, repeat.

The models: one base (optionally 4-bit), a PeftModel holding
  "policy"  the SFT adapter, trainable,
  "ref"     a frozen copy of the same SFT adapter: the reference is the SFT policy (not the bare base),
  "reward"  the rm stage's adapter, frozen, with its score head kept beside it (align/rl/reward.py),
and a value head Linear(hidden, 1) on the policy's last hidden states: the critic shares the policy's
forward pass. By default it reads them detached and its gradients are clipped apart from the policy's:
with the value loss reaching the policy adapter (ppo.shared_critic, the classic shared actor-critic) its
gradient was 10-60x the policy's, and after joint clipping the critic set the update (docs/benchmarks.md,
round 7). Only the policy adapter and the value head require grad. LoRA copies are
megabytes; the base is loaded once.

Shapes: B sequences, P prompt tokens (left padded), R response tokens (right padded). Masks are float
tensors of 1 (real response token) and 0 (padding after the first EOS).
"""

import json
import logging
import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from align import AlignError, adapters
from align.rl import kl as klmod

log = logging.getLogger(__name__)

POLICY, REF, REWARD = "policy", "ref", "reward"


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


# ----------------------------------------------------------------------------------------------
# one base, several adapters
# ----------------------------------------------------------------------------------------------


@contextmanager
def use_adapter(model, name: str):
    """Run with adapter `name` active, then restore the previous adapter and every requires_grad flag
    (peft's set_adapter makes the adapter it activates trainable)."""
    previous = model.active_adapter
    if name == previous:
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def backbone(model):
    """The decoder stack under a PeftModel / CausalLM (LoRA layers are injected in place, so calling it
    runs the active adapter)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def lm_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state


def hidden_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config().hidden_size


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of the same tokens at rollout and update time: dropout would make them differ.
    It also makes the reward adapter's scores deterministic without switching to eval mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_policy(cfg, tokenizer, sft_adapter: Path | str, device=None):
    """The base (4-bit if cfg.peft.load_in_4bit) with the SFT adapter twice: "policy" (trainable) and
    "ref" (frozen reference). Dropout off. Returns the PeftModel with "policy" active."""
    from peft import prepare_model_for_kbit_training

    from align import models

    sft_adapter = Path(sft_adapter)
    adapters.check_supported(cfg.peft, stage="ppo", init_from=sft_adapter)
    if cfg.peft.method == "full" or not (sft_adapter / "adapter_config.json").exists():
        raise AlignError(f"ppo trains a LoRA-family adapter on a frozen base: {sft_adapter} is not a PEFT adapter "
                         f"folder; run sft with peft=lora, qlora or dora (peft=full is not supported by ppo)")
    base = models.load_model(cfg, "causal", tokenizer)
    if cfg.peft.load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    elif device is not None:
        base = base.to(device)
    model = adapters.load(base, sft_adapter, adapter_name=POLICY, is_trainable=True)
    model.load_adapter(str(sft_adapter), adapter_name=REF, is_trainable=False)
    model.set_adapter(POLICY)
    disable_dropout(model)
    return model


def check_trainable(model) -> None:
    """Only the policy adapter may require grad inside the PeftModel (the value head lives outside it)."""
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and f".{POLICY}." not in n]
    if wrong:
        raise AlignError(f"ppo: parameters outside the policy adapter require grad, e.g. {wrong[0]}")
    if not any(p.requires_grad for p in model.parameters()):
        raise AlignError("ppo: the policy adapter has no trainable parameters")


class PolicyValue(nn.Module):
    """The trainable part, as one module (what DDP wraps): the policy adapter inside the PeftModel
    and the value head. forward -> (logits, values) at the R positions predicting the response tokens."""

    def __init__(self, model, value_head: nn.Linear, shared_critic: bool = False):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.shared_critic = shared_critic  # True: the value loss also trains the policy adapter

    def forward(self, input_ids, attention_mask, n_response: int, temperature: float = 1.0):
        hidden = last_hidden(self.model, input_ids, attention_mask)[:, -n_response - 1:-1]
        logits = lm_head(self.model)(hidden).float() / temperature
        critic_in = hidden if self.shared_critic else hidden.detach()
        values = self.value_head(critic_in.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups clipped each on its own: one with a shared critic, else policy and value head."""
        if self.shared_critic:
            return [self.trainable()]
        head = {id(p) for p in self.value_head.parameters()}
        return [[p for p in self.trainable() if id(p) not in head], list(self.value_head.parameters())]


def new_value_head(model) -> nn.Linear:
    """Linear(hidden, 1) starting at zero: initial values 0, no noise in the first advantages."""
    emb = model.get_input_embeddings().weight
    head = nn.Linear(hidden_size(model), 1, dtype=torch.float32, device=emb.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------
# rollouts
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    prompts: list  # the prompt messages of each row
    query_ids: torch.Tensor  # (B, P) left padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right padded after the first EOS
    response_mask: torch.Tensor  # (B, R) float
    has_eos: torch.Tensor  # (B,) bool
    texts: list[str] = field(default_factory=list)  # decoded responses (special tokens skipped)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)


def encode_prompts(tokenizer, rows: list[dict], max_prompt_length: int) -> list[tuple[list, list[int]]]:
    """Prompt-only rows -> (messages, token ids with the generation prompt). Longer prompts are dropped."""
    out, dropped = [], 0
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        out.append((row["prompt"], ids))
    if dropped:
        log.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(rows), max_prompt_length)
    if not out:
        raise AlignError(f"no prompt fits in {max_prompt_length} tokens (trainer.max_length - ppo.max_new_tokens)")
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def truncate_after_eos(response_ids: torch.Tensor, eos: list[int], pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad the rest. Returns (ids, mask, has_eos)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    has_eos = is_eos.any(-1)
    length = response_ids.shape[1]
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, length - 1, dtype=torch.long))
    positions = torch.arange(length, device=response_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).float()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, has_eos


def generation_config(tokenizer, model, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                      top_p: float = 1.0):
    """A fresh config, so the model's own defaults (top_k, repetition penalty, ...) never change the
    distribution PPO optimises."""
    from transformers import GenerationConfig

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_ids(tokenizer, model),
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(**kwargs)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[tuple[list, list[int]]], gen_config, adapter_name: str = POLICY
            ) -> Rollout:
    """Sample (or decode greedily) one response per prompt with adapter `adapter_name`."""
    device = model.get_input_embeddings().weight.device
    query_ids, query_mask = left_pad([ids for _, ids in prompts], tokenizer.pad_token_id, device)
    with use_adapter(model, adapter_name):
        seqs = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config)
    eos = gen_config.eos_token_id
    response_ids, response_mask, has_eos = truncate_after_eos(
        seqs[:, query_ids.shape[1]:], [eos] if isinstance(eos, int) else list(eos), tokenizer.pad_token_id
    )
    lengths = response_mask.sum(-1).long().tolist()
    texts = [tokenizer.decode(response_ids[i, :n], skip_special_tokens=True) for i, n in enumerate(lengths)]
    return Rollout([m for m, _ in prompts], query_ids, query_mask, response_ids, response_mask, has_eos, texts)


@torch.no_grad()
def evaluate(model, tokenizer, prompts, reward_fn, adapter_name: str, max_new_tokens: int, batch_size: int
             ) -> dict:
    """Greedy responses with one adapter, scored by reward_fn (None: no scores, only the texts): mean score, EOS
    rate, mean length. Unlike generation.chat_generate it leaves the model in train mode (see train())."""
    gen = generation_config(tokenizer, model, max_new_tokens, do_sample=False)
    scores, eos, lengths, samples = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        batch = rollout(model, tokenizer, prompts[i:i + batch_size], gen, adapter_name)
        s = reward_fn(batch).cpu() if reward_fn is not None else torch.full((len(batch.texts),), float("nan"))
        scores += s.tolist()
        eos += batch.has_eos.cpu().tolist()
        lengths += batch.response_mask.sum(-1).cpu().tolist()
        samples += [(p, t, float(x)) for p, t, x in zip(batch.prompts, batch.texts, s)]
    return {"scores": scores, "eos": eos, "lengths": lengths, "samples": samples}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Everything a checkpoint needs besides weights, optimizer and RNG."""

    update: int = 0  # updates done
    beta: float = 0.0
    moments: RunningMoments = field(default_factory=RunningMoments)
    history: list = field(default_factory=list)


def prompt_batch(prompts: list, update: int, batch_size: int, rank: int, world: int, seed: int) -> list:
    """The rows of one rollout batch on one process: a seeded reshuffle of the prompts every epoch,
    read as a stream shared by all processes. A function of the update index, so resuming needs no state."""
    n = len(prompts)
    out = []
    for i in range(batch_size):
        g = (update * world + rank) * batch_size + i
        epoch, pos = divmod(g, n)
        order = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(prompts[order[pos]])
    return out


@torch.no_grad()
def score_rollout(policy_value: PolicyValue, batch: Rollout, reward_fn, state: LoopState, pcfg, accelerator,
                  chunk: int, rule_fn=None) -> dict:
    """Old log-probs, values, reference log-probs, scores -> rewards, advantages, returns (and stats)."""
    model = policy_value.model
    ids, attn, R = batch.input_ids, batch.attention_mask, batch.response_ids.shape[1]
    mask = batch.response_mask
    old_logp, values, ref_logp = [], [], []
    for i in range(0, len(ids), chunk):
        logits, v = policy_value(ids[i:i + chunk], attn[i:i + chunk], R, pcfg.temperature)
        old_logp.append(logprobs_from_logits(logits, batch.response_ids[i:i + chunk]))
        values.append(v)
        with use_adapter(model, REF):
            logits, _ = policy_value(ids[i:i + chunk], attn[i:i + chunk], R, pcfg.temperature)
        ref_logp.append(logprobs_from_logits(logits, batch.response_ids[i:i + chunk]))
    old_logp, values, ref_logp = torch.cat(old_logp), torch.cat(values) * mask, torch.cat(ref_logp)

    raw = reward_fn(batch).float().to(ids.device)
    all_raw = accelerator.gather(raw)
    if pcfg.reward_norm:
        state.moments.update(all_raw)
    scores = shape_scores(raw, batch.has_eos, state.moments if pcfg.reward_norm else None, pcfg.missing_eos_penalty,
                          pcfg.rm_weight)
    rule = rule_fn(batch).float().to(ids.device) if rule_fn is not None else torch.zeros_like(raw)
    scores = scores + pcfg.rule_weight * rule
    if pcfg.samples_per_prompt > 1:
        scores = against_siblings(scores, pcfg.samples_per_prompt)
    # which responses the policy loss reads: all, or with ppo.positive_only those at least as good as their siblings
    trained = (scores >= 0).float() if pcfg.positive_only else torch.ones_like(scores)
    rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, state.beta, pcfg.kl_estimator)
    if pcfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, pcfg.gamma, pcfg.lam)
    # per token, long answers weigh more in the mean than short refusals; per sequence each response counts once
    # (no measurable difference on dev, docs/benchmarks.md round 7)
    per_sequence = pcfg.advantage_whitening == "sequence"
    advantages = masked_whiten(advantages, mask, weights=mask / mask.sum(-1, keepdim=True).clamp(min=1)
                               if per_sequence else None)
    return {
        "old_logp": old_logp, "values": values, "advantages": advantages, "returns": returns,
        "trained": trained, "raw": raw, "all_raw": all_raw, "kl": kl.sum(-1), "rewards": rewards.sum(-1), "rule": rule,
    }


SELECT_METRICS = ("os", "accuracy", "ar_in", "rr_out", "rr_unsafe", "rr_adv")


def best_update(history: list, metric: str) -> int | None:
    """The update with the highest select/<metric> (the earliest on a tie); None when no update was scored."""
    scored = [(r[f"select/{metric}"], -r["update"]) for r in history if r.get(f"select/{metric}") is not None]
    return -max(scored)[1] if scored else None


def check_options(pcfg) -> None:
    """The ppo.* choices, checked before anything is loaded."""
    if pcfg.samples_per_prompt < 1 or pcfg.rollout_batch_size % pcfg.samples_per_prompt:
        raise AlignError(f"ppo.samples_per_prompt ({pcfg.samples_per_prompt}) must be at least 1 and divide "
                         f"ppo.rollout_batch_size ({pcfg.rollout_batch_size})")
    if pcfg.advantage_whitening not in ("token", "sequence"):
        raise AlignError(f"ppo.advantage_whitening must be token or sequence, got {pcfg.advantage_whitening!r}")
    if pcfg.rule_judge not in ("keyword", "classifier"):
        raise AlignError(f"ppo.rule_judge must be keyword or classifier, got {pcfg.rule_judge!r}")
    if pcfg.select_prompts and not pcfg.save_every:
        raise AlignError("ppo.select_prompts picks among checkpoints: set ppo.save_every > 0")
    if pcfg.positive_only and pcfg.samples_per_prompt < 2:
        raise AlignError("ppo.positive_only compares each response with its siblings: set ppo.samples_per_prompt >= 2")
    if pcfg.rm_weight < 0 or (pcfg.rm_weight == 0 and not pcfg.rule_weight):
        raise AlignError(f"ppo.rm_weight must be >= 0, and above 0 unless ppo.rule_weight is (got rm_weight "
                         f"{pcfg.rm_weight}, rule_weight {pcfg.rule_weight}): PPO needs a reward")
    if pcfg.mine_prompts < 0 or (pcfg.mine_prompts and (pcfg.mine_samples < 1 or pcfg.mine_max_new_tokens < 1)):
        raise AlignError(f"ppo.mine_prompts ({pcfg.mine_prompts}) must be >= 0, and when on ppo.mine_samples "
                         f"({pcfg.mine_samples}) and ppo.mine_max_new_tokens ({pcfg.mine_max_new_tokens}) >= 1")
    if pcfg.select_metric not in SELECT_METRICS:
        raise AlignError(f"ppo.select_metric must be one of {', '.join(SELECT_METRICS)}, got {pcfg.select_metric!r}")
    scale = dict(pcfg.rule_scale)
    if set(scale) - {"answer", "refuse"} or not all(isinstance(v, (int, float)) and v >= 0 for v in scale.values()):
        raise AlignError(f"ppo.rule_scale must map answer and/or refuse to a weight >= 0, got {scale}")


def train(policy_value: PolicyValue, tokenizer, prompts: list, reward_fn: Callable[[Rollout], torch.Tensor],
          pcfg, accelerator, *, optimizer=None, tracker=None, out: Path | None = None, seed: int = 0,
          max_grad_norm: float = 1.0, max_prompt_length: int = 512, resume: bool = False,
          save_total_limit: int | None = None, on_update: Callable[["LoopState"], None] | None = None,
          rule_fn: Callable[[Rollout], torch.Tensor] | None = None) -> LoopState:
    """Run pcfg.num_updates PPO updates. `prompts`: prompt-only rows. `reward_fn(rollout) -> (B,)` raw scores
    (the reward model, see align/rl/reward.py's rollout_reward; tests inject synthetic ones); `rule_fn` the
    same for a rule reward in [-1, 1], weighted by pcfg.rule_weight after the scores are normalised. The
    accelerator's gradient_accumulation_steps sets the micro-batch: mini_batch_size / gradient_accumulation_steps."""
    B, M, accum = pcfg.rollout_batch_size, pcfg.mini_batch_size, accelerator.gradient_accumulation_steps
    if B % M or M % accum:
        raise AlignError(f"ppo.rollout_batch_size ({B}) must be a multiple of ppo.mini_batch_size ({M}), "
                         f"itself a multiple of trainer.gradient_accumulation_steps ({accum})")
    check_options(pcfg)
    micro = M // accum
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    model = policy_value.model
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    gen = generation_config(tokenizer, model, pcfg.max_new_tokens, True, pcfg.temperature, pcfg.top_p)
    controller = klmod.controller(pcfg)

    if optimizer is None:
        optimizer = make_optimizer(policy_value, pcfg)
    # DDP only syncs the policy adapter and the value head; the frozen base, "ref" and "reward" stay put
    policy_value._ddp_params_and_buffers_to_ignore = [
        n for n, p in policy_value.named_parameters() if not p.requires_grad
    ] + [n for n, _ in policy_value.named_buffers()]
    wrapped, optimizer = accelerator.prepare(policy_value, optimizer)

    state = LoopState(beta=controller.value)
    ckpt = latest_checkpoint(out) if resume and out is not None else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, policy_value, optimizer, rank)  # restores this process's RNG too
        controller.value = state.beta
        log.info("resumed from %s (update %d)", ckpt, state.update)
    else:
        torch.manual_seed(seed * 1000 + rank)  # each process samples different responses
    while state.update < pcfg.num_updates:
        started = time.perf_counter()
        update = state.update
        k = pcfg.samples_per_prompt  # B // k prompts, each sampled k times in a row (against_siblings reads them so)
        rows = [row for row in prompt_batch(encoded, update, B // k, rank, world, seed) for _ in range(k)]
        # train mode throughout (dropout is off, so it is deterministic): in eval mode bitsandbytes repacks 4-bit
        # weights for CPU inference, after which QLoRA gradients no longer flow through the base layers
        policy_value.train()
        with accelerator.autocast():  # same precision as the training forward, so old/new log-probs compare
            batch = rollout(model, tokenizer, rows, gen)
            data = score_rollout(policy_value, batch, reward_fn, state, pcfg, accelerator, micro, rule_fn)
        mask = batch.response_mask
        ids, attn, R = batch.input_ids, batch.attention_mask, batch.response_ids.shape[1]

        stats: dict[str, list[float]] = {}
        shuffle = torch.Generator().manual_seed(seed * 7 + rank * 1009 + update)
        for _ in range(pcfg.ppo_epochs):
            order = torch.randperm(B, generator=shuffle)
            for start in range(0, B, M):
                for mstart in range(start, start + M, micro):
                    idx = order[mstart:mstart + micro].to(ids.device)
                    with accelerator.accumulate(wrapped):
                        logits, values = wrapped(ids[idx], attn[idx], R, pcfg.temperature)
                        logp = logprobs_from_logits(logits, batch.response_ids[idx])
                        pg, pg_stats = policy_loss(logp, data["old_logp"][idx], data["advantages"][idx],
                                                   mask[idx] * data["trained"][idx, None], pcfg.cliprange)
                        vf, vf_stats = value_loss(values, data["values"][idx], data["returns"][idx], mask[idx],
                                                  pcfg.cliprange_value)
                        loss = pg + pcfg.vf_coef * vf
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and max_grad_norm:
                            # grad_norm: the policy's (with a shared critic, the joint one); value_grad_norm: the head's
                            groups = policy_value.clip_groups()
                            norms = [float(accelerator.clip_grad_norm_(g, max_grad_norm)) for g in groups]
                            stats.setdefault("grad_norm", []).append(norms[0])
                            if len(norms) > 1:
                                stats.setdefault("value_grad_norm", []).append(norms[1])
                        optimizer.step()
                        optimizer.zero_grad()
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach()), mask[idx]).item()
                    for k, v in {**pg_stats, **vf_stats, "policy_loss": pg.item(), "value_loss": vf.item(),
                                 "entropy": entropy}.items():
                        stats.setdefault(k, []).append(v)

        # statistics: rollout ones gathered over processes, optimisation ones averaged
        all_raw = data["all_raw"]
        kl_mean = accelerator.gather(data["kl"]).mean().item()
        lengths = accelerator.gather(mask.sum(-1))
        eos_rate = accelerator.gather(batch.has_eos.float()).mean().item()
        local = {k: sum(v) / len(v) for k, v in stats.items()}
        local["explained_variance"] = explained_variance(data["values"], data["returns"], mask)
        local["total_reward"] = data["rewards"].mean().item()
        keys = sorted(local)
        averaged = accelerator.reduce(torch.tensor([local[k] for k in keys], device=ids.device), "mean")
        record = {
            "update": update + 1,
            "reward_mean": all_raw.mean().item(),
            "reward_std": all_raw.std().item() if len(all_raw) > 1 else 0.0,
            "kl": kl_mean,
            "beta": controller.value,
            "response_length": lengths.float().mean().item(),
            "eos_rate": eos_rate,
            # share of the rollouts the policy loss read (below 1 only with ppo.positive_only)
            "trained_share": accelerator.gather(data["trained"]).mean().item(),
            # mean rule reward (times ppo.rule_scale): 1 when every rollout behaved as expected, -1 when none did
            **({"rule_mean": accelerator.gather(data["rule"]).mean().item()} if rule_fn is not None else {}),
            **{k: float(v) for k, v in zip(keys, averaged.tolist())},
        }
        controller.update(kl_mean, B * world)
        state.beta = controller.value
        state.update = update + 1
        record["seconds"] = time.perf_counter() - started
        state.history.append(record)
        if main:
            rule = f" rule {record['rule_mean']:.2f}" if "rule_mean" in record else ""
            log.info("ppo update %d/%d: reward %.3f%s kl %.3f beta %.4f entropy %.2f clipfrac %.3f len %.1f (%.1fs)",
                     record["update"], pcfg.num_updates, record["reward_mean"], rule, record["kl"], record["beta"],
                     record["entropy"], record["clipfrac"], record["response_length"], record["seconds"])
            if tracker is not None:
                tracker.log({f"train/{k}": v for k, v in record.items() if k != "update"}, step=record["update"])
                if pcfg.sample_every and record["update"] % pcfg.sample_every == 0:
                    rows = [[record["update"], last_user(p), t, float(s)]
                            for p, t, s in zip(batch.prompts, batch.texts, data["raw"].tolist())]
                    tracker.table("samples", ["update", "prompt", "response", "score"], rows)
        if on_update is not None:
            on_update(state)
        if out is not None and pcfg.save_every and state.update % pcfg.save_every == 0:
            save_checkpoint(Path(out) / "checkpoints" / f"checkpoint-{state.update}", policy_value, optimizer,
                            state, accelerator)
            if main and save_total_limit:
                prune_checkpoints(Path(out) / "checkpoints", save_total_limit,
                                  keep_update=best_update(state.history, pcfg.select_metric))

    check_in_sync(policy_value, accelerator)
    return state


def make_optimizer(policy_value: PolicyValue, pcfg, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    head = list(policy_value.value_head.parameters())
    head_ids = {id(p) for p in head}
    policy = [p for p in policy_value.trainable() if id(p) not in head_ids]
    value_lr = pcfg.value_learning_rate if pcfg.value_learning_rate is not None else pcfg.learning_rate
    return torch.optim.AdamW(
        [{"params": policy, "lr": pcfg.learning_rate}, {"params": head, "lr": value_lr}],
        weight_decay=weight_decay,
    )


def check_in_sync(policy_value: PolicyValue, accelerator) -> None:
    """After DDP training every process must hold the same weights."""
    if accelerator.num_processes < 2:
        return
    total = torch.stack([p.detach().double().abs().sum() for p in policy_value.trainable()]).sum()
    sums = accelerator.gather(total.reshape(1))
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-12, atol=0.0):
        raise AlignError(f"ppo: processes diverged (parameter sums {sums.tolist()})")


def last_user(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else str(messages)


# ----------------------------------------------------------------------------------------------
# saving, checkpoints, resume
# ----------------------------------------------------------------------------------------------


def save_adapter(model, adapter_name: str, folder: Path) -> None:
    """Save one adapter in PEFT's format at the top of `folder` (AutoPeftModel* loads it as "default");
    peft's save_pretrained would put a non-default adapter in a subfolder."""
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(folder))


def load_adapter_weights(model, adapter_name: str, folder: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k]
    if missing:
        raise AlignError(f"checkpoint {folder}: adapter weights missing, e.g. {missing[0]}")


def save_value_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_value_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict({k: v.to(head.weight.device) for k, v in load_file(str(path)).items()})


def save_checkpoint(folder: Path, policy_value: PolicyValue, optimizer, state: LoopState, accelerator) -> None:
    """checkpoint-N/: the policy adapter, value head, optimizer, loop state (update, beta, reward moments,
    history) and one RNG state per process. Written to a temp folder and renamed, so it is whole or absent."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(policy_value.model, POLICY, tmp / "adapter")
        save_value_head(policy_value.value_head, tmp / "value_head.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({
            "update": state.update, "beta": state.beta, "moments": vars(state.moments), "history": state.history,
        }, indent=1))
    accelerator.wait_for_everyone()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, policy_value: PolicyValue, optimizer, rank: int) -> LoopState:
    folder = Path(folder)
    load_adapter_weights(policy_value.model, POLICY, folder / "adapter")
    load_value_head(policy_value.value_head, folder / "value_head.safetensors")
    # weights_only: tensors and plain numbers, never a pickle that runs code (checkpoints may come from a shared folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    saved = json.loads((folder / "state.json").read_text())
    rng = folder / f"rng_state_{rank}.pt"
    if rng.exists():
        rng = torch.load(rng, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return LoopState(update=saved["update"], beta=saved["beta"], moments=RunningMoments(**saved["moments"]),
                     history=saved["history"])


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (runs.last_checkpoint skips a broken newer one, saying so)."""
    from align.runs import last_checkpoint

    found = last_checkpoint(out)
    return Path(found) if found else None


def prune_checkpoints(folder: Path, keep: int, keep_update: int | None = None) -> None:
    """Keep the last `keep` checkpoints, and checkpoint-<keep_update> (the best so far when ppo.select_prompts)."""
    from align.runs import checkpoints

    found = checkpoints(folder)
    for old in [p for p in found[:-keep] if p.name != f"checkpoint-{keep_update}"]:
        shutil.rmtree(old, ignore_errors=True)
