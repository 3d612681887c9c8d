"""Rollouts: prompts in, sampled (or greedy) responses out, as token tensors PPO can score and train on.

    encode_prompts -> chat-templated prompt ids (too-long prompts dropped), once per run
    prompt_batch   -> the prompts of one rollout batch on one process, a function of the update index
    rollout        -> left-padded prompts, one response each with one adapter, cut after the first EOS
    evaluate       -> greedy rollouts in batches, scored: mean score, EOS rate, length, samples

Shared by the ppo loop (align/rl/ppo.py), the reward model (align/rl/reward.py), the ppo and grpo stages and
the scripts. Shapes: B sequences, P prompt tokens (left padded), R response tokens (right padded); the response
mask is a float tensor of 1 (real response token) and 0 (padding after the first EOS).
"""

import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from align import AlignError
from align.rl.policy import POLICY, use_adapter

log = logging.getLogger(__name__)


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
    rate, mean length. Unlike generation.chat_generate it leaves the model in train mode (see align/rl/ppo.py's
    train)."""
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


def compare(model, tokenizer, prompts, reward_fn, adapters: dict, max_new_tokens: int, batch_size: int,
            context: Callable = nullcontext) -> dict:
    """The held-out comparison of ppo and grpo: `evaluate` once per {name: adapter} (None: adapters disabled, the
    base), each inside `context()` (e.g. accelerate's autocast). Returns {name: evaluate's dict}."""
    results = {}
    for name, adapter in adapters.items():
        with (model.disable_adapter() if adapter is None else nullcontext()), context():
            active = adapter if adapter is not None else model.active_adapter
            results[name] = evaluate(model, tokenizer, prompts, reward_fn, active, max_new_tokens, batch_size)
    return results


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


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def last_user(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else str(messages)
