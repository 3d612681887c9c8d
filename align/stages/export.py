"""Stage export: merge a LoRA adapter into its base and save a standalone safetensors model."""

import logging
import time

from align import AlignError, adapters, models, runs

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    started = time.time()
    source = runs.adapter_of(
        runs.find_parent(cfg.run, runs.policy_stages(cfg.export.adapter_stage), cfg.stage.init_from, needed_by="export")
    )
    if not (source / "adapter_config.json").exists():
        raise AlignError(f"export: {source} is not a PEFT adapter folder (adapter_config.json missing)")
    if cfg.peft.load_in_4bit:
        raise AlignError("export merges into full-precision weights; run it with peft=lora (not qlora)")
    out = runs.prepare(cfg.run, "export")
    tokenizer = models.load_tokenizer(cfg.model)
    base = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    merged = adapters.load(base, source).merge_and_unload()
    target = out / "model"
    merged.save_pretrained(target, safe_serialization=cfg.export.safe_serialization)
    tokenizer.save_pretrained(target)
    log.info("merged %s into %s -> %s", source, cfg.model.name_or_path, target)
    metrics = {"params": sum(p.numel() for p in merged.parameters()), "seconds": round(time.time() - started, 1)}
    runs.finish(out, cfg, "export", metrics, parents={"adapter": source}, started=started,
                extra={"output": str(target)})
    return metrics
