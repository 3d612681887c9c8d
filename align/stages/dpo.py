"""Stage dpo: TRL's DPOTrainer on the scope's preference pairs, starting from the SFT adapter.

The SFT adapter is loaded trainable; TRL keeps a frozen copy of it as the "ref" adapter, so the
reference is the SFT policy without a second copy of the base. With dpo.precompute_ref=true the
reference log-probs are computed once before training. The saved adapter is relative to the plain
base, so AutoPeftModelForCausalLM loads it.
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


def train_from_sft(cfg, stage: str, config_cls, trainer_cls, to_rows=lambda rows: rows, **stage_kwargs) -> dict:
    """The shared recipe of the offline preference stages (dpo, kto): SFT adapter in, policy adapter out."""
    started = time.time()
    main = training.is_main_process()
    sft_dir = runs.adapter_of(runs.find_parent(cfg, ("sft",), cfg.stage.init_from, needed_by=stage))
    if not (sft_dir / "adapter_config.json").exists():
        raise AlignError(f"{stage}: {sft_dir} is not a PEFT adapter; {stage} trains on top of an sft adapter")
    out = runs.prepare(cfg, stage, main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg, "causal", tokenizer)
    model = adapters.attach(model, cfg.peft, "CAUSAL_LM", init_from=str(sft_dir))
    pairs_train, pairs_eval = recipes.load(cfg, "preference", tokenizer)
    if stage == "dpo" and cfg.dpo.balance:
        pairs_train = interleave_refusals(pairs_train)
    train_rows = to_rows(pairs_train)
    available, on_policy = len(train_rows), {}
    if negatives.uses_policy(cfg):
        # generation is the costly part: only for the pairs training reaches (eval pairs keep the fixed templates)
        reached = training.rows_for_steps(cfg, pairs_train)
        pairs_train, on_policy = negatives.policy_negatives(cfg, model, tokenizer, reached)
        train_rows = to_rows(pairs_train)
    train_rows, eval_rows = training.rows_for_steps(cfg, train_rows), to_rows(pairs_eval)
    if len(train_rows) < available:
        # with precomputed reference log-probs, rows training never reaches would cost a forward each
        log.info("%s: trainer.max_steps=%d uses %d of %d train rows (already shuffled)", stage,
                 cfg.trainer.max_steps, len(train_rows), available)
    log.info("%s: %d train rows, %d eval rows", stage, len(train_rows), len(eval_rows))

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
    kept = training.count_kept(trainer, cfg, stage, len(train_rows), len(eval_rows))
    training.restore_trainable_dtype(trainer, cfg)
    metrics = training.train(trainer, cfg, out)
    metrics.update(kept)
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
    saved = training.save_model(trainer, cfg, out, tokenizer)
    return training.finish(trainer, tracker, cfg, out, stage, metrics, saved, {"sft": sft_dir},
                           recipes.fingerprint(cfg), started)


def run(cfg) -> dict:
    from trl import DPOConfig, DPOTrainer

    losses = cfg.dpo.loss_type
    losses = [losses] if isinstance(losses, str) else list(losses)
    # weights belong to a list of losses; a single loss type (dpo.loss_type=ipo) runs unweighted
    weights = list(cfg.dpo.loss_weights) if cfg.dpo.loss_weights is not None and len(losses) > 1 else None
    if weights is not None and len(weights) != len(losses):
        raise AlignError(f"dpo.loss_weights: {len(weights)} weights for {len(losses)} loss types {losses}")
    return train_from_sft(cfg, "dpo", DPOConfig, DPOTrainer, loss_type=losses, loss_weights=weights,
                          label_smoothing=cfg.dpo.label_smoothing)
