"""Offline preference training from the SFT stage: the recipe the dpo and kto stages share.

Both stages start from the SFT policy, read the preference pairs of the data build (with the SFT policy's own
answers as rejected sides when `data.rejected_source=policy`), train with a TRL trainer and save the policy. With an
adapter method the SFT adapter is loaded trainable on the base and TRL keeps a frozen copy of it as the reference;
with a full-model method (peft=full, bitfit, freeze) the policy is the SFT model itself (adapters.merged_model: a full
SFT's model/, or the base with the SFT adapter merged in) and the reference is that model before training (precomputed
log-probs, or a frozen copy). Like a stage, this module reads the whole config; it lives outside align/stages/ so
that no stage imports another.
"""

import copy
import logging
import time
from pathlib import Path

from datasets import Dataset

from align import AlignError, adapters, models, negatives, runs, shared_prefix, tracking, training
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


def sft_output(cfg, stage: str) -> Path:
    """The SFT stage's saved output this stage starts from, or the one-line refusal when it cannot."""
    sft_dir = runs.adapter_of(runs.find_parent(cfg.run, ("sft",), cfg.stage.init_from, needed_by=stage))
    is_adapter, is_model = (sft_dir / "adapter_config.json").exists(), (sft_dir / "config.json").exists()
    if not (is_adapter or is_model):
        raise AlignError(f"{stage}: {sft_dir} is neither a PEFT adapter nor a saved model; {stage} starts from the "
                         f"sft stage's adapter/ or model/")
    if is_model and not adapters.saves_full_model(cfg.peft):
        # an adapter trained on the SFT model would name a base that no later stage (or AutoPeftModel) loads
        raise AlignError(f"{stage}: {sft_dir} is a whole sft model (sft ran with peft=full, bitfit or freeze), not "
                         f"an adapter; a peft={cfg.peft.method} adapter trained on it would not load on the base later "
                         f"stages use: run {stage} with peft=full, or sft with peft=lora")
    return sft_dir


def precompute_ref(cfg, stage: str) -> bool:
    """<stage>.precompute_ref, but not with several processes: for datasets held in memory TRL (1.16) caches the
    precomputed log-probs in a file under each process's own temporary folder, so the other ranks look for rank 0's
    file and fail. There the reference runs beside the policy at every step instead (one more forward per step)."""
    asked = getattr(cfg, stage).precompute_ref
    processes = training.distributed_state().num_processes
    if asked and processes > 1:
        log.warning("%s: %s.precompute_ref is off with %d processes (TRL's cache of the reference log-probs is not "
                    "shared between them); the reference runs at every step", stage, stage, processes)
    return asked and processes == 1


def load_policy(cfg, stage: str, sft_dir: Path, tokenizer, precomputed: bool):
    """(the trainable policy, the reference model TRL gets). With an adapter method: the SFT adapter trainable on
    the base, reference None (TRL copies the adapter as "ref"). With a full-model method: the SFT model; reference
    None when TRL precomputes the reference log-probs from the model before its first step (`precomputed`, from
    precompute_ref), else a frozen copy (TRL would load one from the config's name_or_path, which is the bare base
    when the SFT adapter was merged)."""
    if not adapters.saves_full_model(cfg.peft):
        model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
        return adapters.attach(model, cfg.peft, "CAUSAL_LM", init_from=str(sft_dir)), None
    adapters.check_supported(cfg.peft, stage=stage)  # e.g. a 4-bit base cannot train in full: say so before loading
    model = adapters.attach(adapters.merged_model(cfg.model, cfg.peft, tokenizer, sft_dir), cfg.peft, "CAUSAL_LM")
    log.info("%s: peft=%s trains the sft model %s itself", stage, cfg.peft.method, sft_dir)
    if precomputed:
        return model, None
    return model, copy.deepcopy(model).eval().requires_grad_(False)


def train_from_sft(cfg, stage: str, config_cls, trainer_cls, to_rows=lambda rows: rows, **stage_kwargs) -> dict:
    """The shared recipe of the offline preference stages (dpo, kto): the SFT policy in, the trained policy out
    (adapter/ with an adapter method, model/ with a full-model method)."""
    started = time.time()
    main = training.is_main_process()
    sft_dir = sft_output(cfg, stage)
    out = runs.prepare(cfg.run, stage, main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    precomputed = precompute_ref(cfg, stage)  # decided (and warned about) once
    model, ref_model = load_policy(cfg, stage, sft_dir, tokenizer, precomputed)
    train_rows, eval_rows, available, on_policy = preference_rows(cfg, stage, model, tokenizer, to_rows)

    if cfg.trainer.shared_prefix and hasattr(model, "peft_config"):
        shared_prefix.enable(model, stage)  # before the trainer: its constructor precomputes the reference log-probs
    tracker = tracking.start(cfg, stage, main)
    args = training.trainer_args(
        cfg, out, tracker, config_cls, has_eval=bool(eval_rows),
        beta=getattr(cfg, stage).beta,
        precompute_ref_log_probs=precomputed,
        max_length=cfg.trainer.max_length,
        **stage_kwargs,
    )
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
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
