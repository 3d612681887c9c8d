"""Stage generate: answer prompts with one or several adapters on one base, switching per request.

    python -m align stage=generate generate.prompts='["What is a W-2?"]' run.name=taxhelper
    python -m align stage=generate generate.adapters=[outputs/x/sft/adapter,outputs/x/dpo/adapter] \
        generate.prompts_file=prompts.jsonl

Adapters load once with peft's load_adapter and are switched with set_adapter; the base is never reloaded.
"""

import json
import logging
import time
from pathlib import Path

from align import AlignError, adapters, models, runs
from align.data import jsonl
from align.generation import chat_generate, scope_conversations

log = logging.getLogger(__name__)


def read_prompts(cfg) -> list[str]:
    prompts = list(cfg.generate.prompts)
    if cfg.generate.prompts_file:
        path = Path(cfg.generate.prompts_file)
        if not path.is_file():
            raise AlignError(f"generate.prompts_file: {path} not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise AlignError(f"{path}:{n}: expected a JSON object with a \"prompt\" string") from None
            else:
                prompts.append(line.strip())
    if not prompts:
        raise AlignError("generate: no prompts; set generate.prompts=[...] or generate.prompts_file=FILE")
    return prompts


def adapter_paths(cfg) -> dict[str, Path]:
    if cfg.generate.adapters:
        paths = {}
        for p in map(Path, cfg.generate.adapters):
            name = p.parent.name if p.name == "adapter" else p.name  # outputs/x/dpo/adapter -> "dpo"
            paths[name if name not in paths else f"{name}_{len(paths)}"] = p
    else:  # this run's most aligned policy, or the base model when none has finished
        found = [s for s in runs.POLICY_STAGES if runs.is_finished(runs.stage_dir(cfg.run, s))]
        paths = {found[0]: runs.adapter_of(runs.stage_dir(cfg.run, found[0]))} if found else {}
    for name, path in paths.items():
        if not (path / "adapter_config.json").exists():
            raise AlignError(f"generate.adapters: {path} is not a PEFT adapter folder (adapter_config.json missing)")
    return paths


def load_adapters(model, paths: dict[str, Path]):
    """All adapters on one base: the first wraps it, the rest are added beside it."""
    names = list(paths)
    if not names:
        return model
    model = adapters.load(model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model


def answer(model, tokenizer, cfg, prompts: list[str], adapter: str | None) -> list[str]:
    convs = scope_conversations(cfg.scope.system_prompt, prompts)
    if adapter is not None:
        model.set_adapter(adapter)
    texts, _ = chat_generate(model, tokenizer, convs, cfg.generate.max_new_tokens, batch_size=cfg.eval.batch_size,
                             batch_tokens=cfg.eval.batch_tokens,
                             do_sample=cfg.generate.do_sample, desc=f"answering ({adapter or 'base'})",
                             cpu_bf16=models.cpu_autocast(cfg.model, cfg.peft))
    return texts


def run(cfg) -> dict:
    started = time.time()
    prompts = read_prompts(cfg)
    paths = adapter_paths(cfg)
    out = runs.prepare(cfg.run, "generate")
    tokenizer = models.load_tokenizer(cfg.model)
    model = load_adapters(models.load_model(cfg.model, cfg.peft, "causal", tokenizer), paths)
    rows = []
    for adapter in (list(paths) or [None]):
        for prompt, text in zip(prompts, answer(model, tokenizer, cfg, prompts, adapter)):
            rows.append({"adapter": adapter or "base", "prompt": prompt, "response": text})
            print(f"\n[{adapter or 'base'}] {prompt}\n{text}")
    jsonl.write(out / "generations.jsonl", rows)
    metrics = {"n_prompts": len(prompts), "adapters": list(paths) or ["base"]}
    runs.finish(out, cfg, "generate", metrics, parents=paths, started=started,
                extra={"output": str(out / "generations.jsonl")})
    return metrics
