"""Stage safety_eval: does the model answer what it should and decline what lies outside its scope?

Generates answers to scope-eval prompts (batched, left padding, greedy by default) with the scope's
system prompt, judges each answered/refused, and reports AR_in, RR_out, unsafe and adversarial refusal
rates and OS = harmonic mean(AR_in, RR_out), before (adapters disabled) and after. Gates exit 1.
"""

import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from align import AlignError, adapters, models, runs, tracking
from align.data import jsonl, recipes, scope as scope_mod, sources
from align.evaluation import judges, metrics, report
from align.generation import chat_generate, scope_conversations

log = logging.getLogger(__name__)
GOLD = judges.JUDGE_DATA / "gold.jsonl"


def prompt_rows(cfg) -> tuple[list[dict], list[str]]:
    """eval.prompts files when given, else the recipe's held-out scope-eval split."""
    if cfg.eval.prompts:
        rows = sources.load_scope_files(cfg.eval.prompts, cfg.data.on_bad_rows)
        names = [str(path) for path in cfg.eval.prompts]
    else:
        rows = recipes.load(cfg, "scope_eval")[1]
        names = [f"data={cfg.data.recipe} (held-out split)"]
    if not rows:
        raise AlignError("safety_eval: no prompts; set eval.prompts=[file.jsonl] or use a recipe with an eval split")
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    return rows, names


def is_adapter(path: Path) -> bool:
    """An adapter folder, as opposed to a full model (peft=full's `model/`, or an export)."""
    return (Path(path) / "adapter_config.json").exists()


def find_adapter(cfg) -> Path | None:
    if cfg.eval.adapter:
        path = Path(cfg.eval.adapter)
        if not (is_adapter(path) or (path / "config.json").exists()):
            raise AlignError(f"eval.adapter: {path} is neither a PEFT adapter folder (adapter_config.json) nor a "
                             "model folder (config.json)")
        return path
    if cfg.eval.adapter_stage == "base":
        return None
    for stage in runs.policy_stages(cfg.eval.adapter_stage):
        if runs.is_finished(runs.stage_dir(cfg.run, stage)):
            return runs.adapter_of(runs.stage_dir(cfg.run, stage))
    if cfg.eval.adapter_stage != "auto":
        runs.find_parent(cfg.run, (cfg.eval.adapter_stage,), needed_by="safety_eval")  # raises the one-line error
    log.info("safety_eval: no trained adapter in run '%s'; evaluating the base model", cfg.run.name)
    return None


def scope_judge(cfg):
    """eval.judge, reading this scope's own refusal openers as refusals."""
    openers = scope_mod.refusal_openers(cfg.scope)  # a refusal in this scope's own wording is a refusal
    if cfg.eval.judge != "llm":
        return judges.make_judge(cfg.eval.judge, refusal_openers=openers)
    if cfg.eval.judge_model:
        return judges.make_judge("llm", model_name_or_path=cfg.eval.judge_model, refusal_openers=openers)
    raise AlignError("eval.judge=llm needs eval.judge_model=<hub id or folder> (a chat model to act as judge)")


def judged(rows, responses, verdicts, judge_name, phase) -> list[dict]:
    return [{"prompt": r["prompt"], "expected": r["expected"], "category": r["category"], "attack": r.get("attack"),
             "response": resp, "verdict": v, "judge": judge_name, "model": phase}
            for r, resp, v in zip(rows, responses, verdicts)]


def run(cfg) -> dict:
    started = time.time()
    adapter = find_adapter(cfg)  # a wrong path fails before any folder is made or data built
    out = runs.prepare(cfg.run, "safety_eval")
    rows, prompt_sources = prompt_rows(cfg)
    judge = scope_judge(cfg)
    gold = judges.score_on_gold(judge, judges.load_rows(GOLD))
    tracker = tracking.start(cfg, "safety_eval")
    results, speed = answer_and_judge(cfg, adapter, rows, judge)

    scores = {phase: metrics.compute_metrics(rs) for phase, rs in results.items()}
    flat = {f"{phase}/{k}": v for phase, s in scores.items() for k, v in s.items()}
    flat.update({f"speed/{phase}/{k}": v for phase, s in speed.items() for k, v in s.items()})
    flat.update({"judge": judge.name, "judge/gold_accuracy": gold["accuracy"], "judge/gold_f1": gold["f1"],
                 "judge/gold_n": gold["n"], "adapter": str(adapter) if adapter else None, "n_prompts": len(rows),
                 "prompt_sources": prompt_sources})
    jsonl.write(out / "responses.jsonl", [r for phase in results for r in results[phase]])
    report_path = report.write_report(
        out, scores["after"], scores.get("before"),
        per_category={phase: metrics.per_category(rs) for phase, rs in results.items()},
        judge_info={"name": judge.name, "gold": gold},
        extra={"model": cfg.model.name_or_path, "adapter": adapter or "none (base model)",
               "scope": cfg.scope.name, "prompts": ", ".join(prompt_sources),
               "generation": f"{speed['after']['tokens_per_second']} tokens/s, batch {cfg.eval.batch_size}"},
    )
    print(report.summary_table(scores["after"], scores.get("before")))
    track(tracker, flat, results, out)

    failed = gates(cfg, scores["after"])
    flat["gates_failed"] = failed
    runs.finish(out, cfg, "safety_eval", flat, parents={"adapter": adapter} if adapter else {},
                data_fingerprint=None if cfg.eval.prompts else recipes.fingerprint(cfg), started=started,
                extra={"report": str(report_path)})
    if failed:
        print(f"safety_eval: gate failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return flat


def answer_and_judge(cfg, adapter: Path | None, rows: list[dict], judge) -> tuple[dict, dict]:
    """Judged responses of the model ("after") and, with eval.compare_base, of the base ("before")."""
    tokenizer = models.load_tokenizer(cfg.model)
    full = adapter is not None and not is_adapter(adapter)
    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer, path=adapter if full else None)
    if adapter is not None and not full:
        model = adapters.load(model, adapter)
    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
               batch_tokens=cfg.eval.batch_tokens, do_sample=cfg.eval.do_sample,
               cpu_bf16=models.cpu_autocast(cfg.model, cfg.peft))
    results, speed = {}, {}
    responses, speed["after"] = chat_generate(model, tokenizer, convs, desc="answering (after)", **gen)
    results["after"] = judged(rows, responses, judge.judge([r["prompt"] for r in rows], responses),
                              judge.name, ("model" if full else "adapter") if adapter else "base")
    if adapter is not None and cfg.eval.compare_base:
        if full:  # a second model: the base, loaded once the fine-tuned one is gone
            del model
            model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
        with nullcontext() if full else model.disable_adapter():
            responses, speed["before"] = chat_generate(model, tokenizer, convs, desc="answering (before)", **gen)
        results["before"] = judged(rows, responses, judge.judge([r["prompt"] for r in rows], responses),
                                   judge.name, "base")
    return results, speed


def track(tracker, flat: dict, results: dict, out: Path) -> None:
    tracker.summary({k: v for k, v in flat.items() if not isinstance(v, list)})
    tracker.table("responses", ["model", "category", "expected", "verdict", "prompt", "response"],
                  [[r["model"], r["category"], r["expected"], r["verdict"], r["prompt"], r["response"]]
                   for phase in results for r in results[phase]])
    tracker.image("rates_by_category", out / report.CHART_NAME)
    tracker.finish()


def gates(cfg, after: dict) -> list[str]:
    failed = []
    for key, metric in (("min_os", "os"), ("min_ar_in", "ar_in"), ("min_rr_out", "rr_out")):
        bound = getattr(cfg.eval, key)
        if bound is not None and (after.get(metric) is None or after[metric] < bound):
            failed.append(f"{metric} = {after.get(metric)} < eval.{key} = {bound}")
    return failed
