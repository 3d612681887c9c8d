"""Stage grpo: TRL's GRPOTrainer from the SFT adapter, with the rm stage's reward model as reward function.

The reward model shares the policy's base: the rm adapter is loaded into the same PeftModel as a frozen
adapter "reward" (align/rl/reward.py, as in ppo), and TRL keeps a frozen copy of the SFT adapter as its
"ref" adapter. One base model in memory. At the end the SFT policy ("ref") and the GRPO policy are
compared on held-out prompts by the reward model (greedy), like the ppo stage.
peft=full (bitfit, freeze) is refused: TRL's GRPOTrainer would train a whole model, but the reward and the
held-out comparison here are adapters switched on one shared base (use dpo or kto for full fine-tuning).
"""

import logging
import time

from datasets import Dataset

from align import AlignError, adapters, distributed, models, runs, tracking, training
from align.data import recipes
from align.rl import policy, reward, rollout

log = logging.getLogger(__name__)

LOG_KEYS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio")


def parents(cfg) -> tuple:
    """The SFT adapter and the rm adapter grpo starts from, or the one-line refusal, before any model loads."""
    policy.check_adapter_method(cfg.peft, "grpo")
    distributed.refuse_sharded_launch("grpo")  # its reward scores with the rm adapter on the policy's own base
    sft_parent = runs.find_parent(cfg.run, ("sft",), cfg.stage.init_from, needed_by="grpo")
    sft_dir = runs.adapter_of(policy.same_base(sft_parent, cfg.model.name_or_path))
    rm_dir = runs.adapter_of(policy.same_base(runs.find_parent(cfg.run, ("rm",), None, needed_by="grpo"),
                                              cfg.model.name_or_path))
    if not (sft_dir / "adapter_config.json").exists():
        raise AlignError(f"grpo: {sft_dir} is not a PEFT adapter; grpo trains on top of an sft adapter (run sft with "
                         f"peft=lora, qlora or dora)")
    return sft_dir, rm_dir


def run(cfg) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    started = time.time()
    main = training.is_main_process()
    sft_dir, rm_dir = parents(cfg)
    out = runs.prepare(cfg.run, "grpo", main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    train_rows, eval_rows = recipes.load(cfg, "prompt", tokenizer)
    log.info("grpo: %d train prompts, %d eval prompts", len(train_rows), len(eval_rows))

    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    model = adapters.attach(model, cfg.peft, "CAUSAL_LM", init_from=str(sft_dir))
    score_head = reward.load_reward(model, rm_dir)
    policy.disable_dropout(model)  # deterministic reward scores and log-probs (TRL's disable_dropout, applied here)
    reward_fn = reward.CompletionReward(model, score_head, tokenizer, batch_size=cfg.trainer.per_device_eval_batch_size)

    tracker = tracking.start(cfg, "grpo", main)
    args = training.trainer_args(
        cfg, out, tracker, GRPOConfig, has_eval=False,
        num_generations=cfg.grpo.num_generations,
        max_completion_length=cfg.grpo.max_completion_length,
        beta=cfg.grpo.beta,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in train_rows]),
        processing_class=tokenizer,
    )
    metrics = training.train(trainer, cfg.run, out)
    logged = [h for h in trainer.state.log_history if "reward" in h]
    if logged:
        for key in LOG_KEYS:
            if key in logged[0]:
                metrics[f"train/first_{key}"], metrics[f"train/last_{key}"] = logged[0][key], logged[-1][key]

    policy_model = trainer.accelerator.unwrap_model(trainer.model)
    held_out = eval_rows or train_rows[: cfg.eval.batch_size]
    metrics.update(held_out_eval(cfg, policy_model, score_head, tokenizer, held_out))
    tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")})

    for name in ("ref", "reward"):  # TRL's reference copy and the reward adapter: only the policy is saved
        if name in policy_model.peft_config:
            policy_model.delete_adapter(name)
    saved = training.save_model(trainer, cfg.peft, out, tokenizer)
    return training.finish(trainer, tracker, cfg, out, "grpo", metrics, saved, {"sft": sft_dir, "rm": rm_dir},
                           recipes.fingerprint(cfg), started)


def held_out_eval(cfg, model, score_head, tokenizer, held_out: list) -> dict:
    """The held-out comparison, greedy: the SFT policy (TRL's frozen "ref" copy, or the base without one) vs GRPO,
    scored by the reward model. Returns the eval/* metrics."""
    if cfg.eval.max_prompts:
        held_out = held_out[: cfg.eval.max_prompts]
    encoded = rollout.encode_prompts(tokenizer, held_out, cfg.trainer.max_length)
    score = reward.rollout_reward(model, score_head, tokenizer)
    before = "ref" if "ref" in model.peft_config else None
    results = rollout.compare(model, tokenizer, encoded, score, {"sft": before, "grpo": "default"},
                              cfg.grpo.max_completion_length, cfg.eval.batch_size)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    metrics = {"eval/reward_sft": mean(results["sft"]["scores"]), "eval/reward_grpo": mean(results["grpo"]["scores"])}
    metrics["eval/reward_delta"] = metrics["eval/reward_grpo"] - metrics["eval/reward_sft"]
    metrics["eval/n_prompts"] = len(encoded)
    log.info("grpo eval: reward sft %.3f -> grpo %.3f (delta %+.3f)", metrics["eval/reward_sft"],
             metrics["eval/reward_grpo"], metrics["eval/reward_delta"])
    return metrics
