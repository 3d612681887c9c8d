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
(`model(..., labels=..., fused_lm_head=True)`, made by SFTTrainer, DPOTrainer, KTOTrainer and the DPO reference
precompute) get the same `FusedCausalLMOutput` back, laid out as TRL expects; a reward model's calls
(`enable(model, head="score")`, RewardTrainer) get the same scores. Calls it cannot share (no common prefix worth
the passes, left padding, position ids of packed rows, a cache) run the original forward.
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
    """How to share this batch, or None where sharing does not apply (left padding, one row, nothing shared).
    Of the two layouts, the common prefix alone or with each row's segment grouped, the one computing fewer padded
    tokens."""
    rows, width = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if rows < 2 or bool((lengths == 0).any()) or not bool((mask == (torch.arange(width) < lengths[:, None])).all()):
        return None  # right padding only: every row's real tokens start at position 0
    trained = labels[:, 1:] != -100  # position t's hidden state predicts labels[t + 1]
    first = torch.where(trained.any(1), trained.float().argmax(1), lengths - 1)
    bound = torch.minimum(first, lengths - 1)  # positions before it predict only ignored labels
    common = (input_ids == input_ids[:1]).all(0).long().cumprod(0).sum()  # the prefix of every row
    prefix = int(min(int(common), int(bound.min())))
    # each row's segment reaches as far as it agrees with some other row (a pair's prompt), never past its bound
    agree = (input_ids[:, None, :] == input_ids[None, :, :]).long().cumprod(2).sum(2).fill_diagonal_(0)
    reach = torch.minimum(agree.max(1).values, bound).clamp(min=prefix)
    keys = [tuple(input_ids[r, prefix:int(reach[r])].tolist()) for r in range(rows)]
    plans = []
    if prefix:
        split = torch.full_like(bound, prefix)
        plans.append(Plan(prefix, torch.zeros(rows, dtype=torch.long), [], split, lengths,
                          prefix + rows * int((lengths - split).max()), rows * width))
    if len(set(keys)) < rows and any(keys) and (prefix or all(keys)):  # a row with no prefix needs a segment
        order = list(dict.fromkeys(keys))
        segments = [torch.tensor(k, dtype=input_ids.dtype) for k in order]
        padded = prefix + len(order) * max(len(k) for k in order) + rows * int((lengths - reach).max())
        plans.append(Plan(prefix, torch.tensor([order.index(k) for k in keys]), segments, reach, lengths, padded,
                          rows * width))
    return min(plans, key=lambda p: p.padded_tokens, default=None)


def worth_sharing(p: Plan | None) -> bool:
    return p is not None and p.padded_tokens <= MIN_SAVING * p.unshared_tokens


def _prefix_passes(forward, p: Plan, input_ids: torch.Tensor, head: dict, **kwargs):
    """Passes A and B: the cache every row reads, with each row's attention mask over it. `head`: what keeps the
    output head's work to one position where the model takes it (logits_to_keep=1 for a causal LM)."""
    device, rows = input_ids.device, input_ids.shape[0]
    cache, prefix_mask = None, torch.ones(rows, p.prefix, dtype=torch.long, device=device)
    if p.prefix:
        ids = input_ids[:1, :p.prefix]
        cache = forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **head, **kwargs).cache
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
                        cache=cache, use_cache=True, **head, **kwargs).cache
        group_of_row = p.group_of_row.to(device)
        cache.batch_select_indices(group_of_row)
        prefix_mask = torch.cat([prefix_mask, seg_mask[group_of_row]], 1)
    else:
        cache.batch_select_indices(torch.zeros(rows, dtype=torch.long, device=device))
    return cache, prefix_mask


def _own_tokens(p: Plan, input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int = 0):
    """Pass C's inputs: each row from its split on, right-padded with pad_id; positions; next-token labels
    (pre-shifted)."""
    rows, width = input_ids.shape
    device = input_ids.device
    split, lengths = p.split.to(device), p.lengths.to(device)
    own = int((lengths - split).max())
    index = split[:, None] + torch.arange(own, device=device)  # original position of each own token
    real = index < lengths[:, None]
    safe = index.clamp(max=width - 1)
    ids = torch.where(real, input_ids.gather(1, safe), torch.full_like(safe, pad_id))
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
    cache, prefix_mask = _prefix_passes(forward, p, input_ids, {"logits_to_keep": 1}, **kwargs)
    ids, own_mask, positions, shift_labels = _own_tokens(p, input_ids, labels)
    out = forward(input_ids=ids, attention_mask=torch.cat([prefix_mask, own_mask], 1), position_ids=positions,
                  cache=cache, shift_labels=shift_labels, fused_lm_head=True, num_items_in_batch=num_items_in_batch,
                  **kwargs)
    for name in PER_TOKEN_FIELDS:
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, _to_original_layout(value, p, input_ids.shape[1]))
    return out


def score_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> Plan | None:
    """A reward model's batch (TRL: every chosen row, then every rejected row): only each row's last real token is
    scored, so every earlier position may be shared, a pair's whole prompt and common opening included. The score
    head reads the last token that is not the pad token, in the shared run within each row's own tokens: where a
    row ends in pad-token ids before that (pad = eos), it is not shared."""
    if pad_id is None:
        return None
    last_real = attention_mask.sum(1) - 1
    labels = torch.full_like(input_ids, -100).scatter(1, last_real[:, None], 0)
    p = plan(input_ids, attention_mask, labels)
    if p is None:
        return None
    positions = torch.arange(input_ids.shape[1])
    scored = (positions * (input_ids != pad_id) * attention_mask.bool()).argmax(1)  # as the score head picks it
    return p if bool((scored >= p.split).all()) else None


def shared_score_forward(forward, input_ids, attention_mask, p: Plan, pad_id: int, **kwargs):
    """A sequence-classification forward (the reward model) in the shared passes: the same scores, one per row."""
    cache, prefix_mask = _prefix_passes(forward, p, input_ids, {}, **kwargs)
    ids, own_mask, positions, _ = _own_tokens(p, input_ids, torch.full_like(input_ids, -100), pad_id)
    return forward(input_ids=ids, attention_mask=torch.cat([prefix_mask, own_mask], 1), position_ids=positions,
                   cache=cache, **kwargs)


def _shareable_call(kwargs: dict, head: str) -> bool:
    """TRL's call on plain right-padded rows: the fused-head call of a causal LM (labels given), the plain call of a
    reward model (no labels). Anything else (packed rows with position ids, a cache, embeddings, pre-shifted labels,
    MoE router logits) runs unshared."""
    plain = (kwargs.get("input_ids") is not None and kwargs.get("attention_mask") is not None
             and not any(kwargs.get(k) is not None for k in ("position_ids", "cache", "past_key_values",
                                                             "inputs_embeds", "shift_labels"))
             and not kwargs.get("output_router_logits"))
    if head == "score":
        return plain and kwargs.get("labels") is None and not kwargs.get("fused_lm_head")
    return plain and kwargs.get("fused_lm_head") is True and kwargs.get("labels") is not None


def _wrapped(original, model, head: str, stats: dict, *args, **kwargs):
    if args or not _shareable_call(kwargs, head) or getattr(model, "is_gradient_checkpointing", False):
        return original(*args, **kwargs)
    input_ids, attention_mask, pad_id = kwargs["input_ids"], kwargs["attention_mask"], model.config.pad_token_id
    p = (score_plan(input_ids.cpu(), attention_mask.cpu(), pad_id) if head == "score"
         else plan(input_ids.cpu(), attention_mask.cpu(), kwargs["labels"].cpu()))
    stats["batches"] += 1
    stats["unshared_tokens"] += input_ids.numel()
    if not worth_sharing(p):
        stats["computed_tokens"] += input_ids.numel()
        return original(**kwargs)
    stats["shared_batches"] += 1
    stats["computed_tokens"] += p.padded_tokens
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels", "fused_lm_head",
                                                          "use_cache")}
    if head == "score":
        return shared_score_forward(original, input_ids, attention_mask, p, pad_id, **rest)
    return shared_forward(original, input_ids, attention_mask, kwargs["labels"], p, **rest)


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


def enable(model, stage: str, head: str = "causal") -> bool:
    """Wrap `model.forward` so TRL's calls share prefixes (head: "causal" for the fused-head calls of sft, dpo and
    kto, "score" for a reward model's); True when the model's forward is wrapped. Idempotent. With a PEFT model it
    can be called before the trainer is built (TRL patches the base model's forward underneath, and the DPO
    reference precompute in the trainer's constructor then shares too); with a plain model only after (TRL
    replaces the model's own forward)."""
    if getattr(model, "_align_shared_prefix_stats", None) is not None:
        return True
    why = unsupported(model)
    if why:
        log.warning("%s: trainer.shared_prefix is on but %s cannot share prefixes; training unshared", stage, why)
        return False
    # the counts live on the model: accelerate wraps the forward again under autocast (bf16), hiding this one
    stats = model._align_shared_prefix_stats = dict(batches=0, shared_batches=0, unshared_tokens=0, computed_tokens=0)
    model.forward = functools.partial(_wrapped, model.forward, model, head, stats)
    return True


def disable(model) -> None:
    """Undo `enable`: the model's own forward again (before a trainer wrapped it), and no counts."""
    if isinstance(model.forward, functools.partial) and model.forward.func is _wrapped:
        model.forward = model.forward.args[0]
    model.__dict__.pop("_align_shared_prefix_stats", None)


def metrics(model) -> dict:
    """What sharing saved on this model's calls: the share of batches shared and the padded tokens computed
    relative to the unshared batches (1.0 = no saving)."""
    stats = getattr(model, "_align_shared_prefix_stats", None)
    if not stats or not stats["batches"]:
        return {}
    return {"train/shared_prefix_batches": stats["shared_batches"] / stats["batches"],
            "train/shared_prefix_token_ratio": stats["computed_tokens"] / stats["unshared_tokens"]}
