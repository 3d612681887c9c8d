"""Shared-prefix training: compute the tokens a batch's rows share once, and let every row attend to them.

Every training row starts with the same system prompt and chat template, and a preference pair's chosen and
rejected rows share their whole prompt. TRL runs every row in full. Here a batch runs in up to three passes over one
key/value cache:

  A. the prefix all rows share (the system prompt and template), once;
  B. the rest of each prompt, once per group of rows that share it (a DPO pair), attending to A;
  C. each row's own tokens, from the last prompt token on, attending to A and its group's B.

Gradients flow back through the cache into A and B from every row that read them, so loss and gradients equal the
unshared computation up to the order of float sums (tests/test_shared_prefix.py). Only positions whose next-token
label is ignored are shared: every trained log-probability is computed in pass C, as before.

It replaces nothing in TRL's losses: `enable(model)` wraps the model's forward, and TRL's calls with its fused LM head
(`model(..., labels=..., fused_lm_head=True)`, made by SFTTrainer, DPOTrainer and the DPO reference precompute) get
the same `FusedCausalLMOutput` back, laid out as TRL expects. Calls it cannot share (no common prefix worth the
passes, left padding, position ids of packed rows, a cache) run the original forward.
"""

import dataclasses
import functools
import logging

import torch

log = logging.getLogger(__name__)

# share only when the padded tokens computed drop below this share of the unshared batch's
MIN_SAVING = 0.9
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@dataclasses.dataclass
class Plan:
    """Where each row of a batch splits: `prefix` tokens all rows share (pass A), a group segment per row group
    (pass B, `group_of_row`, `segments`), and each row's own tokens from `split[r]` on (pass C)."""

    prefix: int
    group_of_row: torch.Tensor  # (rows,) index into segments
    segments: list[torch.Tensor]  # per group: its token ids after the prefix, up to the split
    split: torch.Tensor  # (rows,) first position of the row's own tokens
    lengths: torch.Tensor  # (rows,) real tokens per row
    padded_tokens: int  # tokens the shared passes compute, padding included
    unshared_tokens: int  # tokens the unshared batch computes, padding included


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Plan | None:
    """How to share this batch, or None where sharing does not apply (left padding, one row, too little shared)."""
    rows, width = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if rows < 2 or bool((lengths == 0).any()) or not bool((mask == (torch.arange(width) < lengths[:, None])).all()):
        return None  # right padding only: every row's real tokens start at position 0
    trained = labels[:, 1:] != -100  # position t's hidden state predicts labels[t + 1]
    first = torch.where(trained.any(1), trained.float().argmax(1), lengths - 1)
    bound = torch.minimum(first, lengths - 1)  # positions before it predict only ignored labels
    same = (input_ids == input_ids[:1]).all(0).long().cumprod(0).sum()  # common prefix of every row
    prefix = int(min(int(same), int(bound.min())))
    keys = [tuple(input_ids[r, prefix:int(bound[r])].tolist()) for r in range(rows)]
    if prefix == 0 and not all(keys):
        return None  # a row with neither a shared prefix nor a segment would attend to nothing in pass B
    shared_segments = len(set(keys)) < rows and any(keys)
    if shared_segments:
        order = list(dict.fromkeys(keys))
        group_of_row = torch.tensor([order.index(k) for k in keys])
        segments = [torch.tensor(k, dtype=input_ids.dtype) for k in order]
        split = bound.clone()
    else:  # every row's prompt is its own: only the common prefix is shared
        group_of_row, segments, split = torch.zeros(rows, dtype=torch.long), [], torch.full_like(bound, prefix)
    seg_width = max((len(s) for s in segments), default=0)
    padded = prefix + len(segments) * seg_width + rows * int((lengths - split).max())
    return Plan(prefix, group_of_row, segments, split, lengths, padded, rows * width)


def worth_sharing(p: Plan | None) -> bool:
    return p is not None and p.padded_tokens <= MIN_SAVING * p.unshared_tokens


def _prefix_passes(forward, p: Plan, input_ids: torch.Tensor, **kwargs):
    """Passes A and B: the cache every row reads, with each row's attention mask over it."""
    device, rows = input_ids.device, input_ids.shape[0]
    cache, prefix_mask = None, torch.ones(rows, p.prefix, dtype=torch.long, device=device)
    if p.prefix:
        ids = input_ids[:1, :p.prefix]
        cache = forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                        **kwargs).cache
    if p.segments:
        groups = len(p.segments)
        width = max(len(s) for s in p.segments)
        seg_ids = torch.zeros(groups, width, dtype=input_ids.dtype, device=device)
        seg_mask = torch.zeros(groups, width, dtype=torch.long, device=device)
        for g, seg in enumerate(p.segments):
            seg_ids[g, :len(seg)], seg_mask[g, :len(seg)] = seg.to(device), 1
        if cache is not None:
            cache.batch_select_indices(torch.zeros(groups, dtype=torch.long, device=device))
        ones = torch.ones(groups, p.prefix, dtype=torch.long, device=device)
        positions = (p.prefix + torch.arange(width, device=device)).expand(groups, width)
        cache = forward(input_ids=seg_ids, attention_mask=torch.cat([ones, seg_mask], 1), position_ids=positions,
                        cache=cache, use_cache=True, logits_to_keep=1, **kwargs).cache
        group_of_row = p.group_of_row.to(device)
        cache.batch_select_indices(group_of_row)
        prefix_mask = torch.cat([prefix_mask, seg_mask[group_of_row]], 1)
    else:
        cache.batch_select_indices(torch.zeros(rows, dtype=torch.long, device=device))
    return cache, prefix_mask


def _own_tokens(p: Plan, input_ids: torch.Tensor, labels: torch.Tensor):
    """Pass C's inputs: each row from its split on, right-padded; positions; next-token labels (pre-shifted)."""
    rows, width = input_ids.shape
    device = input_ids.device
    split, lengths = p.split.to(device), p.lengths.to(device)
    own = int((lengths - split).max())
    index = split[:, None] + torch.arange(own, device=device)  # original position of each own token
    real = index < lengths[:, None]
    safe = index.clamp(max=width - 1)
    ids = torch.where(real, input_ids.gather(1, safe), torch.zeros_like(safe))
    next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    shift_labels = torch.where(real, next_labels.gather(1, safe), torch.full_like(safe, -100))
    return ids, real.long(), index, shift_labels


def _to_original_layout(value: torch.Tensor, p: Plan, width: int) -> torch.Tensor:
    """A per-token field of pass C (rows, own) -> TRL's layout for the whole rows (rows, width - 1)."""
    device = value.device
    index = torch.arange(width - 1, device=device)[None] - p.split.to(device)[:, None]
    inside = (index >= 0) & (index < value.shape[1])
    picked = value.gather(1, index.clamp(0, value.shape[1] - 1))
    return torch.where(inside, picked, torch.zeros_like(picked))


def shared_forward(forward, input_ids, attention_mask, labels, p: Plan, num_items_in_batch=None, **kwargs):
    """TRL's fused-head forward of a batch, in the three passes; the same FusedCausalLMOutput layout."""
    cache, prefix_mask = _prefix_passes(forward, p, input_ids, **kwargs)
    ids, own_mask, positions, shift_labels = _own_tokens(p, input_ids, labels)
    out = forward(input_ids=ids, attention_mask=torch.cat([prefix_mask, own_mask], 1), position_ids=positions,
                  cache=cache, shift_labels=shift_labels, fused_lm_head=True, num_items_in_batch=num_items_in_batch,
                  **kwargs)
    for name in PER_TOKEN_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, _to_original_layout(value, p, input_ids.shape[1]))
    return out


def _shareable_call(kwargs: dict) -> bool:
    """TRL's fused-head call on plain right-padded rows; anything else (packed rows with position ids, a cache,
    embeddings, pre-shifted labels, MoE router logits) runs unshared."""
    return (kwargs.get("fused_lm_head") is True and kwargs.get("labels") is not None
            and kwargs.get("input_ids") is not None and kwargs.get("attention_mask") is not None
            and not any(kwargs.get(k) is not None for k in ("position_ids", "cache", "past_key_values",
                                                            "inputs_embeds", "shift_labels"))
            and not kwargs.get("output_router_logits"))


def _wrapped(original, model, stats: dict, *args, **kwargs):
    if args or not _shareable_call(kwargs) or getattr(model, "is_gradient_checkpointing", False):
        return original(*args, **kwargs)
    input_ids, attention_mask, labels = kwargs.pop("input_ids"), kwargs.pop("attention_mask"), kwargs.pop("labels")
    p = plan(input_ids.cpu(), attention_mask.cpu(), labels.cpu())
    stats["batches"] += 1
    stats["unshared_tokens"] += input_ids.numel()
    if not worth_sharing(p):
        stats["computed_tokens"] += input_ids.numel()
        return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    stats["shared_batches"] += 1
    stats["computed_tokens"] += p.padded_tokens
    kwargs.pop("fused_lm_head")
    kwargs.pop("use_cache", None)
    return shared_forward(original, input_ids, attention_mask, labels, p, **kwargs)


def unsupported(model) -> str | None:
    """Why shared prefixes cannot run on this model, or None. They need a plain per-layer key/value cache (no sliding
    window), an attention that takes a padding mask (eager or sdpa) and no prompt-learning PEFT method (those bring
    their own cache). Under gradient checkpointing (which would run each layer's cache update twice) calls run
    unshared."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    peft_config = getattr(model, "peft_config", {})
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "a prompt-learning PEFT method"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation}"
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in
                                                      getattr(config, "layer_types", None) or []):
        return "sliding-window attention"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


def enable(model, stage: str) -> bool:
    """Wrap `model.forward` so TRL's fused-head calls share prefixes; True when the model's forward is wrapped.
    Idempotent. With a PEFT model it can be called before the trainer is built (TRL patches the base model's
    forward underneath, and the DPO reference precompute in the trainer's constructor then shares too); with a
    plain model only after (TRL replaces the model's own forward)."""
    if getattr(model.forward, "shared_prefix_stats", None) is not None:
        return True
    why = unsupported(model)
    if why:
        log.warning("%s: trainer.shared_prefix is on but %s cannot share prefixes; training unshared", stage, why)
        return False
    wrapped = functools.partial(_wrapped, model.forward, model,
                                dict(batches=0, shared_batches=0, unshared_tokens=0, computed_tokens=0))
    wrapped.shared_prefix_stats = wrapped.args[2]
    model.forward = wrapped
    return True


def metrics(model) -> dict:
    """What sharing saved on this model's calls: the share of batches shared and the padded tokens computed
    relative to the unshared batches (1.0 = no saving)."""
    stats = getattr(model.forward, "shared_prefix_stats", None)
    if not stats or not stats["batches"]:
        return {}
    return {"train/shared_prefix_batches": stats["shared_batches"] / stats["batches"],
            "train/shared_prefix_token_ratio": stats["computed_tokens"] / stats["unshared_tokens"]}
