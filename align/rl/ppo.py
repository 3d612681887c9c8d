"""PPO for chat models on ONE frozen base model, readable top to bottom.

    rollout  -> sample responses to a batch of prompts with the policy adapter (left-padded prompts)
    score    -> reward-model score of each response (adapter "reward" + its score head), old log-probs
                and values (adapter "policy" + value head), reference log-probs (adapter "ref")
    rewards  -> per token: -beta * KL(policy || ref), plus at the last response token the (normalised) score
                and rule_weight * the rule reward when one is given (RuleReward); with
                ppo.samples_per_prompt > 1, that sum minus its mean over the other samples of the same prompt
    GAE      -> advantages and returns over the response tokens, advantages whitened
    update   -> several epochs of shuffled minibatches: clipped policy surrogate + clipped value loss,
                gradient accumulation over micro-batches, gradient clipping
    log, checkpoint, repeat.

This module is the loop only. Its parts: the tensor arithmetic in align/rl/losses.py; the one base with adapters
"policy", "ref", "reward" and the value head in align/rl/policy.py; sampling in align/rl/rollout.py; checkpoints
in align/rl/checkpoint.py; the reward model as a reward in align/rl/reward.py.

Shapes: B sequences, P prompt tokens (left padded), R response tokens (right padded). Masks are float
tensors of 1 (real response token) and 0 (padding after the first EOS).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from align import AlignError
from align.rl import kl as klmod
from align.rl.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from align.rl.losses import (
    RunningMoments, against_siblings, entropy_from_logits, explained_variance, gae, logprobs_from_logits, masked_mean,
    masked_whiten, per_token_rewards, policy_loss, shape_scores, value_loss,
)
from align.rl.policy import REF, PolicyValue, use_adapter
from align.rl.rollout import Rollout, encode_prompts, generation_config, last_user, prompt_batch, rollout

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything a checkpoint needs besides weights, optimizer and RNG."""

    update: int = 0  # updates done
    beta: float = 0.0
    moments: RunningMoments = field(default_factory=RunningMoments)
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """What a checkpoint's state.json holds."""
        return {"update": self.update, "beta": self.beta, "moments": vars(self.moments), "history": self.history}

    @classmethod
    def from_dict(cls, saved: dict) -> "LoopState":
        return cls(update=saved["update"], beta=saved["beta"], moments=RunningMoments(**saved["moments"]),
                   history=saved["history"])


@dataclass
class LoopInputs:
    """What one PPO run reads besides the model (a PolicyValue), the ppo.* options and the accelerator."""

    tokenizer: Any
    prompts: list  # prompt-only rows: {"prompt": messages}
    # rollout -> (B,) raw scores: the reward model (align/rl/reward.py's rollout_reward; tests inject synthetic ones)
    reward_fn: Callable[[Rollout], torch.Tensor]
    # the same for a rule reward in [-1, 1], weighted by ppo.rule_weight after the scores are normalised
    rule_fn: Callable[[Rollout], torch.Tensor] | None = None
    seed: int = 0
    max_prompt_length: int = 512  # longer prompts are dropped
    max_grad_norm: float = 1.0  # 0: no gradient clipping
    weight_decay: float = 0.0
    out: Path | None = None  # the stage folder: checkpoints go to out/checkpoints (None: no checkpoints)
    resume: bool = False  # from the newest complete checkpoint under out
    save_total_limit: int | None = None  # checkpoints kept, besides the best one (see best_update)
    tracker: Any = None  # align/tracking.py's tracker, on the main process
    on_update: Callable[[LoopState], None] | None = None  # after each update, on every process


@dataclass
class ScoredBatch:
    """One rollout batch, scored: what the update reads (per token) and what the log reads (per sequence)."""

    old_logp: torch.Tensor  # (B, R) the policy's log-probs at rollout time
    values: torch.Tensor  # (B, R) the value head's, masked
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R)
    raw: torch.Tensor  # (B,) the reward function's scores on this process
    all_raw: torch.Tensor  # the same gathered over processes
    kl: torch.Tensor  # (B,) per-token KL estimates summed over the response
    rewards: torch.Tensor  # (B,) per-token rewards summed over the response
    rule: torch.Tensor  # (B,) the rule reward (zeros without one)


# the scope rates (align/evaluation/metrics.py) ppo.select_metric may pick checkpoints by
SELECT_METRICS = ("os", "accuracy", "ar_in", "rr_out", "rr_unsafe", "rr_adv")


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
    if pcfg.rm_weight < 0 or (pcfg.rm_weight == 0 and not pcfg.rule_weight):
        raise AlignError(f"ppo.rm_weight must be >= 0, and above 0 unless ppo.rule_weight is (got rm_weight "
                         f"{pcfg.rm_weight}, rule_weight {pcfg.rule_weight}): PPO needs a reward")
    if pcfg.select_metric not in SELECT_METRICS:
        raise AlignError(f"ppo.select_metric must be one of {', '.join(SELECT_METRICS)}, got {pcfg.select_metric!r}")


def train(policy_value: PolicyValue, inputs: LoopInputs, pcfg, accelerator) -> LoopState:
    """Run pcfg.num_updates PPO updates (pcfg: the ppo config section) on inputs.prompts. The accelerator's
    gradient_accumulation_steps sets the micro-batch: mini_batch_size / gradient_accumulation_steps."""
    micro = micro_batch_size(pcfg, accelerator)
    check_options(pcfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    model, tokenizer = policy_value.model, inputs.tokenizer
    encoded = encode_prompts(tokenizer, inputs.prompts, inputs.max_prompt_length)
    gen = generation_config(tokenizer, model, pcfg.max_new_tokens, True, pcfg.temperature, pcfg.top_p)
    controller = klmod.controller(pcfg)
    optimizer = make_optimizer(policy_value, pcfg, inputs.weight_decay)
    # DDP only syncs the policy adapter and the value head; the frozen base, "ref" and "reward" stay put
    policy_value._ddp_params_and_buffers_to_ignore = [
        n for n, p in policy_value.named_parameters() if not p.requires_grad
    ] + [n for n, _ in policy_value.named_buffers()]
    wrapped, optimizer = accelerator.prepare(policy_value, optimizer)
    state = start_state(policy_value, optimizer, inputs, controller, rank)

    while state.update < pcfg.num_updates:
        started = time.perf_counter()
        k = pcfg.samples_per_prompt  # B // k prompts, each sampled k times in a row (against_siblings reads them so)
        rows = [row for row in prompt_batch(encoded, state.update, pcfg.rollout_batch_size // k, rank, world,
                                            inputs.seed) for _ in range(k)]
        # train mode throughout (dropout is off, so it is deterministic): in eval mode bitsandbytes repacks 4-bit
        # weights for CPU inference, after which QLoRA gradients no longer flow through the base layers
        policy_value.train()
        with accelerator.autocast():  # same precision as the training forward, so old/new log-probs compare
            batch = rollout(model, tokenizer, rows, gen)
            scored = score_rollout(policy_value, batch, inputs.reward_fn, state, pcfg, accelerator, micro,
                                   inputs.rule_fn)
        shuffle = torch.Generator().manual_seed(inputs.seed * 7 + rank * 1009 + state.update)
        stats = optimise(wrapped, policy_value, optimizer, batch, scored, pcfg, accelerator, inputs.max_grad_norm,
                         shuffle)
        record = update_record(state.update, batch, scored, stats, controller.value, accelerator,
                               with_rule=inputs.rule_fn is not None)
        controller.update(record["kl"], pcfg.rollout_batch_size * world)
        state.beta = controller.value
        state.update += 1
        record["seconds"] = time.perf_counter() - started
        state.history.append(record)
        if accelerator.is_main_process:
            report(record, batch, scored, pcfg, inputs.tracker)
        if inputs.on_update is not None:
            inputs.on_update(state)
        save_if_due(state, policy_value, optimizer, inputs, pcfg, accelerator)

    check_in_sync(policy_value, accelerator)
    return state


def micro_batch_size(pcfg, accelerator) -> int:
    """mini_batch_size / gradient_accumulation_steps, refusing sizes that do not divide."""
    B, M, accum = pcfg.rollout_batch_size, pcfg.mini_batch_size, accelerator.gradient_accumulation_steps
    if B % M or M % accum:
        raise AlignError(f"ppo.rollout_batch_size ({B}) must be a multiple of ppo.mini_batch_size ({M}), "
                         f"itself a multiple of trainer.gradient_accumulation_steps ({accum})")
    return M // accum


def start_state(policy_value: PolicyValue, optimizer, inputs: LoopInputs, controller, rank: int) -> LoopState:
    """A fresh state, or with inputs.resume the newest complete checkpoint's (weights, optimizer, RNG and beta)."""
    ckpt = latest_checkpoint(inputs.out) if inputs.resume and inputs.out is not None else None
    if ckpt is None:
        torch.manual_seed(inputs.seed * 1000 + rank)  # each process samples different responses
        return LoopState(beta=controller.value)
    state = LoopState.from_dict(load_checkpoint(ckpt, policy_value, optimizer, rank))  # restores this process's RNG too
    controller.value = state.beta
    log.info("resumed from %s (update %d)", ckpt, state.update)
    return state


@torch.no_grad()
def score_rollout(policy_value: PolicyValue, batch: Rollout, reward_fn, state: LoopState, pcfg, accelerator,
                  chunk: int, rule_fn=None) -> ScoredBatch:
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
    rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, state.beta, pcfg.kl_estimator)
    if pcfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, pcfg.gamma, pcfg.lam)
    # per token, long answers weigh more in the mean than short refusals; per sequence each response counts once
    # (no measurable difference on dev, docs/benchmarks.md round 7)
    per_sequence = pcfg.advantage_whitening == "sequence"
    advantages = masked_whiten(advantages, mask, weights=mask / mask.sum(-1, keepdim=True).clamp(min=1)
                               if per_sequence else None)
    return ScoredBatch(old_logp=old_logp, values=values, advantages=advantages, returns=returns, raw=raw,
                       all_raw=all_raw, kl=kl.sum(-1), rewards=rewards.sum(-1), rule=rule)


def optimise(wrapped, policy_value: PolicyValue, optimizer, batch: Rollout, scored: ScoredBatch, pcfg, accelerator,
             max_grad_norm: float, shuffle: torch.Generator) -> dict[str, list[float]]:
    """pcfg.ppo_epochs passes over the batch in shuffled minibatches, each accumulated over micro-batches:
    clipped policy surrogate + vf_coef * clipped value loss. `wrapped` is policy_value as the accelerator prepared
    it (DDP). Returns each statistic's values, one per micro-batch (gradient norms: one per optimizer step)."""
    B, M, micro = pcfg.rollout_batch_size, pcfg.mini_batch_size, micro_batch_size(pcfg, accelerator)
    mask = batch.response_mask
    ids, attn, R = batch.input_ids, batch.attention_mask, batch.response_ids.shape[1]
    stats: dict[str, list[float]] = {}
    for _ in range(pcfg.ppo_epochs):
        order = torch.randperm(B, generator=shuffle)
        for start in range(0, B, M):
            for mstart in range(start, start + M, micro):
                idx = order[mstart:mstart + micro].to(ids.device)
                with accelerator.accumulate(wrapped):
                    logits, values = wrapped(ids[idx], attn[idx], R, pcfg.temperature)
                    logp = logprobs_from_logits(logits, batch.response_ids[idx])
                    pg, pg_stats = policy_loss(logp, scored.old_logp[idx], scored.advantages[idx],
                                               mask[idx], pcfg.cliprange)
                    vf, vf_stats = value_loss(values, scored.values[idx], scored.returns[idx], mask[idx],
                                              pcfg.cliprange_value)
                    loss = pg + pcfg.vf_coef * vf
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm:
                        # grad_norm: the policy's; value_grad_norm: the head's (each clipped on its own)
                        norms = [float(accelerator.clip_grad_norm_(g, max_grad_norm))
                                 for g in policy_value.clip_groups()]
                        stats.setdefault("grad_norm", []).append(norms[0])
                        stats.setdefault("value_grad_norm", []).append(norms[1])
                    optimizer.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits.detach()), mask[idx]).item()
                for k, v in {**pg_stats, **vf_stats, "policy_loss": pg.item(), "value_loss": vf.item(),
                             "entropy": entropy}.items():
                    stats.setdefault(k, []).append(v)
    return stats


def update_record(update: int, batch: Rollout, scored: ScoredBatch, stats: dict, beta: float, accelerator,
                  with_rule: bool) -> dict:
    """The history record of update `update` + 1: rollout statistics gathered over processes, optimisation ones
    averaged (every process calls it: the gathers are collective)."""
    mask = batch.response_mask
    all_raw = scored.all_raw
    kl_mean = accelerator.gather(scored.kl).mean().item()
    lengths = accelerator.gather(mask.sum(-1))
    eos_rate = accelerator.gather(batch.has_eos.float()).mean().item()
    local = {k: sum(v) / len(v) for k, v in stats.items()}
    local["explained_variance"] = explained_variance(scored.values, scored.returns, mask)
    local["total_reward"] = scored.rewards.mean().item()
    keys = sorted(local)
    averaged = accelerator.reduce(torch.tensor([local[k] for k in keys], device=batch.query_ids.device), "mean")
    return {
        "update": update + 1,
        "reward_mean": all_raw.mean().item(),
        "reward_std": all_raw.std().item() if len(all_raw) > 1 else 0.0,
        "kl": kl_mean,
        "beta": beta,
        "response_length": lengths.float().mean().item(),
        "eos_rate": eos_rate,
        # mean rule reward: 1 when every rollout behaved as expected, -1 when none did
        **({"rule_mean": accelerator.gather(scored.rule).mean().item()} if with_rule else {}),
        **{k: float(v) for k, v in zip(keys, averaged.tolist())},
    }


def report(record: dict, batch: Rollout, scored: ScoredBatch, pcfg, tracker) -> None:
    """One log line per update; the record to the tracker, and every pcfg.sample_every updates the samples."""
    rule = f" rule {record['rule_mean']:.2f}" if "rule_mean" in record else ""
    log.info("ppo update %d/%d: reward %.3f%s kl %.3f beta %.4f entropy %.2f clipfrac %.3f len %.1f (%.1fs)",
             record["update"], pcfg.num_updates, record["reward_mean"], rule, record["kl"], record["beta"],
             record["entropy"], record["clipfrac"], record["response_length"], record["seconds"])
    if tracker is not None:
        tracker.log({f"train/{k}": v for k, v in record.items() if k != "update"}, step=record["update"])
        if pcfg.sample_every and record["update"] % pcfg.sample_every == 0:
            rows = [[record["update"], last_user(p), t, float(s)]
                    for p, t, s in zip(batch.prompts, batch.texts, scored.raw.tolist())]
            tracker.table("samples", ["update", "prompt", "response", "score"], rows)


def save_if_due(state: LoopState, policy_value: PolicyValue, optimizer, inputs: LoopInputs, pcfg,
                accelerator) -> None:
    """A checkpoint every pcfg.save_every updates, then the old ones pruned (the best one kept)."""
    if inputs.out is None or not pcfg.save_every or state.update % pcfg.save_every:
        return
    folder = Path(inputs.out) / "checkpoints"
    save_checkpoint(folder / f"checkpoint-{state.update}", policy_value, optimizer, state.as_dict(), accelerator)
    if accelerator.is_main_process and inputs.save_total_limit:
        prune_checkpoints(folder, inputs.save_total_limit, keep_update=best_update(state.history, pcfg.select_metric))


def best_update(history: list, metric: str) -> int | None:
    """The update with the highest select/<metric> (the earliest on a tie); None when no update was scored."""
    scored = [(r[f"select/{metric}"], -r["update"]) for r in history if r.get(f"select/{metric}") is not None]
    return -max(scored)[1] if scored else None


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
