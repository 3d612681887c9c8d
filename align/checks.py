"""Checks on the composed config that need no model: numeric ranges and run.name, in one place.

`check(cfg)` runs in `__main__.run_stage` before any stage code (so before a model loads or a finished stage
folder is touched, and for each stage of the pipeline). Hydra's schema already checks keys and types; this
checks values. RANGES is data so it can move next to the config's defaults later.
"""

import math
import os
from typing import NamedTuple

from omegaconf import OmegaConf

from align import AlignError


class Range(NamedTuple):
    lo: float | None  # None: no lower bound
    hi: float | None  # None: no upper bound
    why: str  # one line: what goes wrong outside the range
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False
    also: tuple = ()  # special values allowed outside the range (e.g. -1 = off)


def at_least(lo, why, also=()) -> Range:
    return Range(lo, None, why, also=also)


def above(lo, why) -> Range:
    return Range(lo, None, why, lo_open=True)


UNIT = Range(0, 1, "a rate or probability")
SEED = Range(0, 2**32 - 1, "numpy's seed range; transformers.set_seed seeds numpy too")

# key -> valid range. "a[].b" checks b in every item of the list a. None values (optional options left off) pass.
# ppo.samples_per_prompt, ppo.rm_weight and ppo.mine_prompts are checked with the options they depend on, in
# align/rl/ppo.py's check_options.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "peft.r": at_least(1, "the LoRA rank"),
    "peft.lora_alpha": above(0, "LoRA's scale is lora_alpha / r; 0 switches the adapter off"),
    "peft.lora_dropout": Range(0, 1, "a probability; 1 drops every input", hi_open=True),
    "peft.last_n_layers": at_least(1, "how many top blocks get adapters; null = all"),
    "peft.num_virtual_tokens": at_least(1, "prompt/prefix tuning needs at least one virtual token"),
    "peft.freeze_last_n": at_least(0, "blocks trained besides the head"),
    "trainer.learning_rate": above(0, "0 never moves the weights; below 0 climbs the loss"),
    "trainer.max_steps": at_least(1, "-1 trains trainer.num_train_epochs; 0 would silently train a whole epoch",
                                  also=(-1,)),
    "trainer.num_train_epochs": above(0, "passes over the data when trainer.max_steps=-1"),
    "trainer.per_device_train_batch_size": at_least(1, "rows per step per device"),
    "trainer.per_device_eval_batch_size": at_least(1, "rows per eval step per device"),
    "trainer.gradient_accumulation_steps": at_least(1, "micro-batches per optimizer step"),
    "trainer.warmup_steps": at_least(0, "below 1 a share of the steps, from 1 a number of steps"),
    "trainer.weight_decay": at_least(0, "decoupled decay toward zero; below 0 grows the weights"),
    "trainer.max_grad_norm": at_least(0, "gradient clipping norm; 0 turns clipping off"),
    "trainer.logging_steps": at_least(1, "log every N steps"),
    "trainer.save_steps": at_least(1, "checkpoint every N steps"),
    "trainer.save_total_limit": at_least(0, "checkpoints kept; 0 keeps all"),
    "trainer.eval_steps": at_least(1, "evaluate every N steps; null = never"),
    "trainer.max_length": at_least(1, "tokens per row"),
    "data.eval_fraction": Range(0, 1, "share of rows held out; 1 leaves nothing to train on", hi_open=True),
    "data.balance_cap": at_least(1, "rows kept per cluster"),
    "data.target_size": at_least(1, "rows the diversity filter keeps"),
    "data.max_rows": at_least(1, "rows per split for smoke runs; null = all"),
    "data.sources[].count": at_least(0, "rows taken from the source"),
    "data.sources[].weight": at_least(0, "a multiple of the source's rows; above 1 upsamples"),
    "rm.tie_epsilon": at_least(0, "a margin below which a pair counts as a tie"),
    "rm.center_rewards_coefficient": at_least(0, "a penalty weight"),
    "dpo.beta": above(0, "the KL strength; at 0 the loss is flat, below 0 it prefers the rejected answers"),
    "dpo.label_smoothing": Range(0, 0.5, "the chance a label is flipped, robust DPO and cDPO", hi_open=True),
    "dpo.loss_weights[]": at_least(0, "weights of the loss types"),
    "kto.beta": above(0, "the KL strength toward the reference"),
    "kto.desirable_weight": above(0, "weight of desirable rows"),
    "kto.undesirable_weight": above(0, "weight of undesirable rows"),
    "ppo.rollout_batch_size": at_least(1, "prompts per rollout"),
    "ppo.mini_batch_size": at_least(1, "sequences per optimisation minibatch"),
    "ppo.ppo_epochs": at_least(1, "passes over each rollout batch"),
    "ppo.num_updates": at_least(1, "rollout+update iterations"),
    "ppo.max_new_tokens": at_least(1, "tokens per sampled response"),
    "ppo.temperature": above(0, "sampling temperature; 0 divides by zero"),
    "ppo.top_p": Range(0, 1, "nucleus mass", lo_open=True),
    "ppo.learning_rate": above(0, "the policy's step size"),
    "ppo.value_learning_rate": above(0, "the value head's step size; null = ppo.learning_rate"),
    "ppo.gamma": UNIT,
    "ppo.lam": UNIT,
    "ppo.cliprange": above(0, "the PPO ratio clip"),
    "ppo.cliprange_value": above(0, "the value clip"),
    "ppo.vf_coef": at_least(0, "weight of the value loss"),
    "ppo.kl_coef": at_least(0, "the KL penalty"),
    "ppo.kl_target": above(0, "the adaptive controller's target KL"),
    "ppo.kl_horizon": at_least(1, "the adaptive controller's horizon in samples"),
    "ppo.sample_every": at_least(0, "sample table every N updates; 0 = off"),
    "ppo.save_every": at_least(0, "checkpoint every N updates; 0 = off"),
    "ppo.rule_weight": at_least(0, "weight of the rule reward"),
    "ppo.seed": SEED,
    "ppo.mine_samples": at_least(1, "answers sampled per mined prompt"),
    "ppo.mine_max_new_tokens": at_least(1, "tokens per mined answer"),
    "grpo.num_generations": at_least(2, "GRPO's advantage compares completions of one prompt"),
    "grpo.max_completion_length": at_least(1, "tokens per completion"),
    "grpo.beta": at_least(0, "the KL coefficient; 0 = no reference"),
    "eval.max_new_tokens": at_least(1, "tokens per answer; 0 answers nothing and every prompt looks refused"),
    "eval.batch_size": at_least(1, "prompts generated together"),
    "eval.max_prompts": at_least(1, "prompts evaluated; null = all"),
    "eval.min_os": UNIT,
    "eval.min_ar_in": UNIT,
    "eval.min_rr_out": UNIT,
    "generate.max_new_tokens": at_least(1, "tokens per answer"),
}


def num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def describe(r: Range) -> str:
    """The valid range in words: '> 0', '>= 1', 'in [0, 0.5)', '-1 or >= 1'."""
    if r.lo is not None and r.hi is not None:
        text = f"in {'(' if r.lo_open else '['}{num(r.lo)}, {num(r.hi)}{')' if r.hi_open else ']'}"
    elif r.lo is not None:
        text = f"{'>' if r.lo_open else '>='} {num(r.lo)}"
    else:
        text = f"{'<' if r.hi_open else '<='} {num(r.hi)}"
    return " or ".join([*(num(v) for v in r.also), text])


def inside(value, r: Range) -> bool:
    if value in r.also:
        return True
    if not math.isfinite(value):
        return False
    lo_ok = r.lo is None or (value > r.lo if r.lo_open else value >= r.lo)
    hi_ok = r.hi is None or (value < r.hi if r.hi_open else value <= r.hi)
    return lo_ok and hi_ok


def values(cfg, key: str):
    """(shown key, value) pairs for a RANGES key; 'a[].b' expands over the list a."""
    if "[]" not in key:
        yield key, OmegaConf.select(cfg, key, default=None)
        return
    head, _, tail = key.partition("[]")
    for i, item in enumerate(OmegaConf.select(cfg, head, default=None) or []):
        sub = OmegaConf.select(item, tail.lstrip("."), default=None) if tail else item
        yield f"{head}[{i}]{tail}", sub


def check_ranges(cfg) -> None:
    for key, r in RANGES.items():
        for shown, value in values(cfg, key):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AlignError(f"{shown}={value!r}: expected a number {describe(r)} ({r.why})")
            if not inside(value, r):
                raise AlignError(f"{shown}={num(value)}: expected {describe(r)} ({r.why})")


def check_run_name(cfg) -> None:
    """run.name is one folder under run.output_dir: never empty, '.', '..', a path or absolute."""
    name = cfg.run.name
    name = "" if name is None else str(name)
    hint = "expected a plain folder name under run.output_dir, e.g. run.name=exp1"
    if not name.strip():
        raise AlignError(f"run.name is empty: {hint}")
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if name in (".", "..") or any(s in name for s in seps) or "\0" in name or os.path.isabs(name):
        raise AlignError(f"run.name={name!r}: {hint} (no path separators, '.' or '..')")
    root = os.path.normpath(os.path.abspath(cfg.run.output_dir))
    if os.path.dirname(os.path.normpath(os.path.join(root, name))) != root:
        raise AlignError(f"run.name={name!r} resolves outside run.output_dir={cfg.run.output_dir}: {hint}")


def check(cfg) -> None:
    """Every check that needs only the config; raises AlignError with one line naming key, value and range."""
    check_run_name(cfg)
    check_ranges(cfg)
