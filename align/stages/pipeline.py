"""Stage pipeline (the default): data -> sft -> rm -> dpo|ppo -> safety_eval under one run.name.

Each stage runs exactly as `python -m align stage=<name> <your overrides>` would. Finished stages are
skipped (pipeline.force redoes them), an interrupted stage resumes from its checkpoint, and a failing
stage stops the chain with one line; running the same command again picks up where it stopped.
"""

import json
import logging
import time
from pathlib import Path

from align import AlignError, checks, runs

log = logging.getLogger(__name__)

POLICIES = ("dpo", "ppo", "grpo")
SUMMARY_KEYS = (("OS", "os"), ("AR_in", "ar_in"), ("RR_out", "rr_out"), ("unsafe refusal", "rr_unsafe"),
                ("adversarial refusal", "rr_adv"))


def chain(cfg) -> list[str]:
    if cfg.pipeline.stages:
        return list(cfg.pipeline.stages)
    if cfg.pipeline.policy not in POLICIES:
        raise AlignError(f"pipeline.policy: expected one of {', '.join(POLICIES)}, got {cfg.pipeline.policy!r}")
    return ["data", "sft", "rm", cfg.pipeline.policy, "safety_eval"]


def forced(cfg, stages: list[str]) -> set[str]:
    force = cfg.pipeline.force
    if force is True:
        return set(stages)
    if not force:
        return set()
    names = [force] if isinstance(force, str) else list(force)
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise AlignError(f"pipeline.force: {unknown[0]!r} is not in this pipeline ({', '.join(stages)})")
    return set(names)


def user_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return []
    drop = ("stage=", "pipeline.", "run.overwrite=", "run.resume=", "run.name=", "run.output_dir=")
    return [o for o in task if not o.lstrip("+~").startswith(drop)]


def compose_stage(cfg, stage: str, extra: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    own = list(cfg.pipeline.overrides.get(stage) or [])
    # precedence, lowest first: the stage's config, the policy's defaults, your shared overrides, your per-stage ones
    policy = list(cfg.pipeline.ppo_overrides.get(stage) or []) if cfg.pipeline.policy == "ppo" else []
    overrides = [*policy, *user_overrides(), *own, f"stage={stage}", f"run.name={cfg.run.name}",
                 f"run.output_dir={cfg.run.output_dir}", *extra]
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_module("align.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run(cfg) -> dict:
    from align.__main__ import run_stage

    stages = chain(cfg)
    redo = forced(cfg, stages)
    unknown = [s for s, o in cfg.pipeline.overrides.items() if o and s not in stages]
    if unknown:
        raise AlignError(f"pipeline.overrides: {unknown[0]!r} is not in this pipeline ({', '.join(stages)})")
    for stage in stages:  # a bad value in a late stage's overrides fails now, not after minutes of training
        try:
            checks.check(compose_stage(cfg, stage, []))
        except AlignError as exc:
            raise AlignError(f"pipeline stage {stage}: {exc}") from exc
    timings: dict[str, float | str] = {}
    earlier: dict[str, float] = {}  # seconds a skipped stage took when it ran, from its manifest
    started = time.time()
    for stage in stages:
        out = runs.stage_dir(cfg, stage)
        if runs.is_finished(out) and stage not in redo:
            log.info("pipeline: %s already finished (%s), skipping", stage, out)
            timings[stage] = "skipped"
            took = runs.read_manifest(out).get("seconds")
            if took is not None:
                earlier[stage] = took
            continue
        extra = ["run.overwrite=true"] if stage in redo else []
        if runs.last_checkpoint(runs.work_dir(cfg, stage)):  # interrupted, or an interrupted redo (<stage>.new)
            extra.append("run.resume=true")
        log.info("pipeline: running %s", stage)
        t0 = time.time()
        try:
            run_stage(compose_stage(cfg, stage, extra))
        except AlignError as exc:
            raise AlignError(f"pipeline stopped at {stage}: {exc} (fix it and rerun the same command)") from exc
        except Exception as exc:
            log.exception("pipeline: %s failed", stage)
            raise AlignError(f"pipeline stopped at {stage}: {type(exc).__name__}: {exc} "
                             f"(rerun the same command to resume; HYDRA_FULL_ERROR=1 for the traceback)") from exc
        timings[stage] = round(time.time() - t0, 1)
    summary = summarize(cfg, stages, timings, round(time.time() - started, 1), earlier)
    print(summary)
    root = Path(cfg.run.output_dir) / cfg.run.name
    (root / "report.md").write_text(summary + "\n")
    log.info("pipeline report: %s", root / "report.md")
    return {"timings": timings}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summarize(cfg, stages: list[str], timings: dict, total: float, earlier: dict | None = None) -> str:
    earlier = earlier or {}
    root = Path(cfg.run.output_dir) / cfg.run.name
    lines = [f"# align pipeline: {cfg.run.name}", "",
             f"Base model `{cfg.model.name_or_path}`, peft `{cfg.peft.method}`, data `{cfg.data.recipe}`, "
             f"scope `{cfg.scope.name}`.", ""]
    ev = root / "safety_eval" / "metrics.json"
    if "safety_eval" in stages and ev.exists():
        m = json.loads(ev.read_text())
        lines += ["| metric | before | after | delta |", "|---|---|---|---|"]
        for label, key in SUMMARY_KEYS:
            b, a = m.get(f"before/{key}"), m.get(f"after/{key}")
            d = None if a is None or b is None else a - b
            lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {'-' if d is None else f'{d:+.3f}'} |")
        lines += ["", f"Judge: `{m.get('judge')}` (accuracy {_fmt(m.get('judge/gold_accuracy'))} on the gold set); "
                      f"{m.get('n_prompts')} held-out prompts; evaluated adapter: `{m.get('adapter')}`.", ""]
    lines += ["| stage | seconds | outputs |", "|---|---|---|"]
    for s in stages:
        t = timings.get(s)
        shown = f"{t:.0f}" if not isinstance(t, str) else t + (f" (took {earlier[s]:.0f})" if s in earlier else "")
        lines.append(f"| {s} | {shown} | `{root / s}` |")
    all_runs = sum(t for t in timings.values() if not isinstance(t, str)) + sum(earlier.values())
    lines += [f"| total | {total:.0f}" + (f" (all stages as run: {all_runs:.0f})" if earlier else "") + " | |", ""]
    wandb_dir = root / "wandb"
    if wandb_dir.exists():
        lines.append(f"W&B runs (group `{cfg.run.name}`): `{wandb_dir}`; upload offline runs with "
                     f"`wandb sync {wandb_dir}/offline-run-*`.")
    return "\n".join(lines)
