"""Stage sft: instruction SFT with TRL's SFTTrainer, loss on assistant tokens only.

Recipe: resolve inputs -> build data -> load base + adapter -> train -> save adapter -> manifest.
"""

import logging
import time

from datasets import Dataset

from align import adapters, models, runs, tracking, training
from align.data import recipes

log = logging.getLogger(__name__)


def per_assistant_turn(rows: list[dict]) -> list[dict]:
    """messages rows -> prompt/completion rows, one per assistant turn.

    TRL computes a completion-only loss on this format with any chat template, while its
    assistant_only_loss needs templates with {% generation %} markers, which most models lack.
    """
    out = []
    for row in rows:
        msgs = row["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                out.append({"prompt": msgs[:i], "completion": [m]})
    return out


def run(cfg) -> dict:
    from trl import SFTConfig, SFTTrainer

    started = time.time()
    main = training.is_main_process()
    out = runs.prepare(cfg.run, "sft", main_process=main)
    tokenizer = models.load_tokenizer(cfg.model)
    train_rows, eval_rows = recipes.load(cfg, "sft", tokenizer)
    if cfg.sft.assistant_only_loss:
        train_rows, eval_rows = per_assistant_turn(train_rows), per_assistant_turn(eval_rows)
    else:
        train_rows = [{"messages": r["messages"]} for r in train_rows]
        eval_rows = [{"messages": r["messages"]} for r in eval_rows]
    log.info("sft: %d train rows, %d eval rows", len(train_rows), len(eval_rows))

    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    model = adapters.attach(model, cfg.peft, "CAUSAL_LM", init_from=cfg.stage.init_from)
    counts = adapters.param_counts(model)
    log.info("trainable params: %d of %d (%.2f%%)", counts["trainable_params"], counts["total_params"],
             100 * counts["trainable_share"])

    tracker = tracking.start(cfg, "sft", main)
    args = training.trainer_args(
        cfg, out, tracker, SFTConfig, has_eval=bool(eval_rows),
        max_length=cfg.trainer.max_length,
        packing=cfg.trainer.packing,
        completion_only_loss=cfg.sft.assistant_only_loss,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    metrics = training.fit(trainer, cfg, "sft", out, len(train_rows), len(eval_rows))
    if eval_rows:
        metrics.update(trainer.evaluate())
    saved = training.save_model(trainer, cfg.peft, out, tokenizer)
    parents = {"init_from": cfg.stage.init_from} if cfg.stage.init_from else {}
    return training.finish(trainer, tracker, cfg, out, "sft", metrics, saved, parents,
                           recipes.fingerprint(cfg), started)
