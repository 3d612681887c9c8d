"""Offline preference training from the SFT adapter: the recipe the dpo and kto stages share.

Both stages load the SFT adapter trainable on the base, read the preference pairs of the data build (with the
SFT policy's own answers as rejected sides when `data.rejected_source=policy`), train with a TRL trainer and save
the policy adapter. Like a stage, this module reads the whole config; it lives outside align/stages/ so that no
stage imports another.
"""

import logging
import time

from datasets import Dataset

from align import AlignError, adapters, models, negatives, runs, tracking, training
from align.data import recipes

log = logging.getLogger(__name__)

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def interleave_refusals(rows: list) -> list:
    """Alternate refuse and answer pairs (scope data marks them), so the rows a short run reaches are balanced
    and neither side's pull dominates; rows without the mark keep their order."""
    if not any("refuse" in r for r in rows):
        return rows
    refuse = [r for r in rows if r.get("refuse")]
    answer = [r for r in rows if not r.get("refuse")]
    out = []
    for i in range(max(len(refuse), len(answer))):
        out += [r[i] for r in (answer, refuse) if i < len(r)]
    return out


def preference_rows(cfg, stage: str, model, tokenizer, to_rows) -> tuple[list, list, int, dict]:
    """The rows training reaches and the eval rows, with on-policy rejected sides where the data asks for them."""
    pairs_train, pairs_eval = recipes.load(cfg, "preference", tokenizer)
    if stage == "dpo" and cfg.dpo.balance:
        pairs_train = interleave_refusals(pairs_train)
    train_rows = to_rows(pairs_train)
    available, on_policy = len(train_rows), {}
    if negatives.uses_policy(cfg.data):
        # generation is the costly part: only for the pairs training reaches (eval pairs keep the fixed templates)
        reached = training.rows_for_steps(cfg.trainer, pairs_train)
        pairs_train, on_policy = negatives.policy_negatives(model, tokenizer, reached, cfg.data, cfg.scope,
                                                                 cfg.eval, models.cpu_autocast(cfg.model, cfg.peft))
        train_rows = to_rows(pairs_train)
    train_rows, eval_rows = training.rows_for_steps(cfg.trainer, train_rows), to_rows(pairs_eval)
    if len(train_rows) < available:
        # with precomputed reference log-probs, rows training never reaches would cost a forward each
        log.info("%s: trainer.max_steps=%d uses %d of %d train rows (already shuffled)", stage,
                 cfg.trainer.max_steps, len(train_rows), available)
    log.info("%s: %d train rows, %d eval rows", stage, len(train_rows), len(eval_rows))
    return train_rows, eval_rows, available, on_policy


def train_from_sft(cfg, stage: str, config_cls, trainer_cls, to_rows=lambda rows: rows, **stage_kwargs) -> dict:
    """The shared recipe of the offline preference stages (dpo, kto): SFT adapter in, policy adapter out."""
    started = time.time()
    main = training.is_main_process()
    sft_dir = runs.adapter_of(runs.find_parent(cfg.run, ("sft",), cfg.stage.init_from, needed_by=stage))
    if not (sft_dir / "adapter_config.json").exists():
        raise AlignError(f"{stage}: {sft_dir} is not a PEFT adapter; {stage} trains on top of an sft adapter")
    out = runs.prepare(cfg.run, stage, main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    model = adapters.attach(model, cfg.peft, "CAUSAL_LM", init_from=str(sft_dir))
    train_rows, eval_rows, available, on_policy = preference_rows(cfg, stage, model, tokenizer, to_rows)

    tracker = tracking.start(cfg, stage, main)
    args = training.trainer_args(
        cfg, out, tracker, config_cls, has_eval=bool(eval_rows),
        beta=getattr(cfg, stage).beta,
        precompute_ref_log_probs=getattr(cfg, stage).precompute_ref,
        max_length=cfg.trainer.max_length,
        **stage_kwargs,
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    metrics = training.fit(trainer, cfg, stage, out, len(train_rows), len(eval_rows))
    metrics["data/train_rows_available"] = available
    metrics.update(on_policy)
    last = [h for h in trainer.state.log_history if any(k in h for k in REWARD_KEYS)]
    if last:
        metrics.update({f"train/{k}": last[-1][k] for k in REWARD_KEYS if k in last[-1]})
    if eval_rows:
        metrics.update(trainer.evaluate())
        log.info("%s eval: rewards/accuracies %s, margins %s", stage, metrics.get("eval_rewards/accuracies"),
                 metrics.get("eval_rewards/margins"))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(policy, "peft_config", {}):
        policy.delete_adapter("ref")  # TRL's frozen reference copy; only the trained policy is saved
    saved = training.save_model(trainer, cfg.peft, out, tokenizer)
    return training.finish(trainer, tracker, cfg, out, stage, metrics, saved, {"sft": sft_dir},
                           recipes.fingerprint(cfg), started)
