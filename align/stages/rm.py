"""Stage rm: a pairwise Bradley-Terry reward model with TRL's RewardTrainer under LoRA/QLoRA.

The score head trains in full beside the adapter (peft's modules_to_save). The adapter starts from
the SFT adapter of the same run (rm.init=sft) or from scratch on the base (rm.init=base), and is
always saved relative to the plain base, so AutoPeftModelForSequenceClassification loads it.
With peft=full (every weight trains, model/ is saved) and rm.init=sft the backbone is the SFT model's:
a full SFT's model/, or the base with the SFT adapter merged in; a fresh score head goes on top. A full
SFT model with an adapter method here is refused (the adapter would start from the base, not from SFT).
With data.rejected_source=policy the refuse pairs' rejected side is the SFT policy's own compliant
answer (align/negatives.py), in train and eval pairs, so the accuracy measures what PPO will rely on.
"""

import logging
import time

import torch
import torch.nn.functional as F
from datasets import Dataset

from align import AlignError, adapters, models, negatives, runs, tracking, training
from align.data import recipes

log = logging.getLogger(__name__)


def init_from_adapter(model, adapter_dir) -> int:
    """Copy a causal-LM adapter's LoRA weights into the reward model's fresh adapter (same backbone keys)."""
    import re

    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    own = model.state_dict()
    # peft saves "...q_proj.lora_A.weight"; the live module holds "...q_proj.lora_A.default.weight"
    mapped = {re.sub(r"\.(lora_\w+?)\.(weight|bias)$", r".\1.default.\2", k): v for k, v in saved.items()}
    missing = [k for k in mapped if k not in own or own[k].shape != mapped[k].shape]
    if missing:
        raise AlignError(f"rm: SFT adapter {adapter_dir} does not match the peft settings (e.g. {missing[0]}); "
                         f"use the same peft.r/target_modules or rm.init=base")
    model.load_state_dict(mapped, strict=False)
    return len(mapped)


@torch.no_grad()
def pairwise_eval(model, tokenizer, rows: list[dict], max_length: int, tie_epsilon: float, batch_size: int = 8) -> dict:
    """Accuracy, ties and margins on held-out pairs. A tie is never correct, so collapsed rewards score 0."""
    model.eval()

    def scores(convs):
        out = []
        for i in range(0, len(convs), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out.append(model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    chosen = scores([r["prompt"] + r["chosen"] for r in rows])
    rejected = scores([r["prompt"] + r["rejected"] for r in rows])
    margin = chosen - rejected
    ties = margin.abs() <= tie_epsilon
    n = max(len(rows), 1)
    return {
        "eval/accuracy": float(((margin > tie_epsilon).sum() / n)),
        "eval/ties": int(ties.sum()),
        "eval/tie_rate": float(ties.sum() / n),
        "eval/mean_margin": float(margin.mean()) if len(rows) else 0.0,
        "eval/loss": float(-F.logsigmoid(margin).mean()) if len(rows) else 0.0,
        "eval/n_pairs": len(rows),
    }


def fit_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Cut chosen/rejected answers to fit max_length with their prompt. TRL's RewardTrainer drops longer pairs,
    which would leave mostly short refusal pairs; the preference shows in the opening tokens anyway."""
    out = []
    for row in rows:
        head = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        budget = max_length - prompt - 4  # end-of-turn tokens the template adds after the answer
        if budget < 8:
            out.append(row)  # the prompt alone is too long: TRL drops it and count_kept reports it
            continue
        cut = {}
        for side in ("chosen", "rejected"):
            msg = row[side][-1]
            ids = tokenizer(msg["content"], add_special_tokens=False)["input_ids"]
            text = msg["content"] if len(ids) <= budget else tokenizer.decode(ids[:budget])
            cut[side] = [*row[side][:-1], {**msg, "content": text}]
        out.append({**row, **cut})
    return out


def policy_negatives(cfg, tokenizer, sft_dir, rows: list[dict]) -> tuple[list[dict], dict]:
    """The SFT policy's own compliant answers as the rejected side of refuse pairs (see align.negatives), in
    training and eval pairs alike, so the reward model learns and is measured on what PPO will sample. The policy
    is the SFT adapter on the base, or a full SFT's model/ as saved. Without an SFT stage (rm.init=base) there is
    no policy yet and the templates stay."""
    if sft_dir is None:
        log.info("rm: no SFT policy to write on-policy negatives (rm.init=%s); templates stay", cfg.rm.init)
        return rows, {}
    if (sft_dir / "config.json").exists():
        policy = models.load_model(cfg.model, cfg.peft, "causal", tokenizer, path=sft_dir)
    else:
        policy = adapters.attach(models.load_model(cfg.model, cfg.peft, "causal", tokenizer), cfg.peft,
                                 "CAUSAL_LM", init_from=str(sft_dir))
    rows, on_policy = negatives.policy_negatives(policy, tokenizer, rows, cfg.data, cfg.scope, cfg.eval,
                                                 models.cpu_autocast(cfg.model, cfg.peft))
    del policy
    return rows, on_policy


def sft_parent(cfg):
    """The SFT output the reward model starts from (None with rm.init=base), or the one-line refusal, before any
    model loads."""
    if not (cfg.rm.init == "sft" or cfg.stage.init_from):
        if cfg.rm.init != "base":
            raise AlignError(f"rm.init: expected sft or base, got {cfg.rm.init!r}")
        return None
    adapters.check_supported(cfg.peft, "SEQ_CLS", "rm")  # e.g. methods that cannot start from the sft weights
    sft_dir = runs.adapter_of(runs.find_parent(cfg.run, ("sft",), cfg.stage.init_from, needed_by="rm"))
    if (sft_dir / "config.json").exists() and not adapters.saves_full_model(cfg.peft):
        # a fresh adapter on the base would silently drop what SFT learned
        raise AlignError(f"rm: {sft_dir} is a whole sft model (sft ran with peft=full, bitfit or freeze), not an "
                         f"adapter; a peft={cfg.peft.method} reward model starts from the sft adapter's weights: run "
                         f"rm with peft=full, or rm.init=base")
    return sft_dir


def reward_model(cfg, tokenizer, sft_dir):
    """What RewardTrainer trains: the base (or, with peft=full and an SFT parent, the SFT model's backbone) under a
    fresh score head, with the adapter (started from the SFT adapter's LoRA weights when there is one)."""
    full = adapters.saves_full_model(cfg.peft)
    if sft_dir is not None and full:
        model = adapters.merged_model(cfg.model, cfg.peft, tokenizer, sft_dir, "score")
        log.info("rm: peft=%s starts from the sft model %s (score head new)", cfg.peft.method, sft_dir)
    else:
        model = models.load_model(cfg.model, cfg.peft, "score", tokenizer)
    model = adapters.attach(model, cfg.peft, "SEQ_CLS")
    if sft_dir is not None and not full:
        n = init_from_adapter(model, sft_dir)
        log.info("rm: initialised %d LoRA tensors from %s", n, sft_dir)
    return model


def run(cfg) -> dict:
    from trl import RewardConfig, RewardTrainer

    started = time.time()
    main = training.is_main_process()
    sft_dir = sft_parent(cfg)
    parents = {"sft": sft_dir} if sft_dir is not None else {}
    out = runs.prepare(cfg.run, "rm", main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    train_rows, eval_rows = recipes.load(cfg, "preference", tokenizer)
    on_policy = {}
    if negatives.uses_policy(cfg.data):
        train_rows = training.rows_for_steps(cfg.trainer, train_rows)
        both, on_policy = policy_negatives(cfg, tokenizer, sft_dir, train_rows + eval_rows)
        train_rows, eval_rows = both[:len(train_rows)], both[len(train_rows):]
    train_rows = fit_pairs(train_rows, tokenizer, cfg.trainer.max_length)
    eval_rows = fit_pairs(eval_rows, tokenizer, cfg.trainer.max_length)
    log.info("rm: %d train pairs, %d eval pairs", len(train_rows), len(eval_rows))

    model = reward_model(cfg, tokenizer, sft_dir)

    tracker = tracking.start(cfg, "rm", main)
    args = training.trainer_args(
        cfg, out, tracker, RewardConfig, has_eval=bool(eval_rows),
        max_length=cfg.trainer.max_length,
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    metrics = training.fit(trainer, cfg, "rm", out, len(train_rows), len(eval_rows))
    metrics.update(on_policy)  # counts over train and eval pairs
    if eval_rows:
        metrics.update(pairwise_eval(trainer.model, tokenizer, eval_rows, cfg.trainer.max_length,
                                     cfg.rm.tie_epsilon, cfg.trainer.per_device_eval_batch_size))
        log.info("rm eval: accuracy %.3f, ties %d, mean margin %.3f", metrics["eval/accuracy"],
                 metrics["eval/ties"], metrics["eval/mean_margin"])
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")})
    saved = training.save_model(trainer, cfg.peft, out, tokenizer)
    return training.finish(trainer, tracker, cfg, out, "rm", metrics, saved, parents,
                           recipes.fingerprint(cfg), started)
