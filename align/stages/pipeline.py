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
from align.rl import policy

log = logging.getLogger(__name__)

POLICIES = ("dpo", "ppo", "grpo")
SUMMARY_KEYS = (("OS", "os"), ("AR_in", "ar_in"), ("RR_out", "rr_out"), ("unsafe refusal", "rr_unsafe"),
                ("adversarial refusal", "rr_adv"))


def chain(cfg) -> list[str]:
    if cfg.pipeline.stages:
        return list(cfg.pipeline.stages)
    if cfg.pipeline.policy not in POLICIES:
        raise AlignError(f"pipeline.policy: expected one of {', '.join(POLICIES)}, got {cfg.pipeline.policy!r}")
    if cfg.pipeline.policy in ("ppo", "grpo"):  # refused before sft and rm spend their time
        policy.check_adapter_method(cfg.peft, cfg.pipeline.policy)
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
    from align.config import compose_in_app

    own = list(cfg.pipeline.overrides.get(stage) or [])
    # precedence, lowest first: the stage's config, the policy's defaults, your shared overrides, your per-stage ones
    policy = list(cfg.pipeline.ppo_overrides.get(stage) or []) if cfg.pipeline.policy == "ppo" else []
    overrides = [*policy, *user_overrides(), *own, f"stage={stage}", f"run.name={cfg.run.name}",
                 f"run.output_dir={cfg.run.output_dir}", *extra]
    return compose_in_app(overrides)


def run(cfg) -> dict:
    from align.launch import run_stage

    stages = chain(cfg)
    redo = forced(cfg, stages)
    unknown = [s for s, o in cfg.pipeline.overrides.items() if o and s not in stages]
    if unknown:
        raise AlignError(f"pipeline.overrides: {unknown[0]!r} is not in this pipeline ({', '.join(stages)})")
    composed = {}
    for stage in stages:  # a bad value in a late stage's overrides fails now, not after minutes of training
        try:
            composed[stage] = compose_stage(cfg, stage, [])
            checks.check(composed[stage])
        except AlignError as exc:
            raise AlignError(f"pipeline stage {stage}: {exc}") from exc
    timings: dict[str, float | str] = {}
    earlier: dict[str, float] = {}  # seconds a skipped stage took when it ran, from its manifest
    started = time.time()
    for i, stage in enumerate(stages):
        out = runs.stage_dir(cfg.run, stage)
        why = None if stage in redo or not runs.is_finished(out) else stale(composed[stage], stage, out)
        if why:
            log.warning("pipeline: %s is out of date (%s); redoing it and the stages after it", stage, why)
        if why or stage in redo:
            redo |= set(stages[i:])  # everything downstream was built on the old outputs
        if runs.is_finished(out) and stage not in redo:
            log.info("pipeline: %s already finished (%s), skipping", stage, out)
            timings[stage] = "skipped"
            took = runs.read_manifest(out).get("seconds")
            if took is not None:
                earlier[stage] = took
            continue
        extra = ["run.overwrite=true"] if stage in redo else []
        if runs.last_checkpoint(runs.work_dir(cfg.run, stage)):  # interrupted, or an interrupted redo (<stage>.new)
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


# sections of the config a stage does not read: changing them never makes its outputs stale
NOT_READ = ("run", "pipeline", "tracking", "hydra")
OWN_SECTION = {"sft": "sft", "rm": "rm", "dpo": "dpo", "kto": "kto", "ppo": "ppo", "grpo": "grpo",
               "safety_eval": "eval", "export": "export", "generate": "generate"}


# the data build reads only these (the trainer's max_length there only feeds the length-budget report)
DATA_READS = ("seed", "model", "data", "scope", "stage")


def _relevant(config: dict, stage: str) -> dict:
    if stage == "data":
        return {k: v for k, v in config.items() if k in DATA_READS}
    others = {v for k, v in OWN_SECTION.items() if k != stage} - {"eval"}  # eval: generation settings, read by many
    return {k: v for k, v in config.items() if k not in NOT_READ and k not in others}


def _first_difference(old, new, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def stale(stage_cfg, stage: str, out: Path) -> str | None:
    """Why a finished stage no longer matches what this pipeline would build (None: up to date): a config key it
    reads changed, a parent folder's content changed since it was recorded, or the data build changed."""
    from omegaconf import OmegaConf

    saved_file = out / "config.yaml"
    if saved_file.exists():
        saved = OmegaConf.to_container(OmegaConf.load(saved_file))
        key = _first_difference(_relevant(saved, stage), _relevant(runs.config_dict(stage_cfg), stage))
        if key:
            return f"{key} changed"
    manifest = runs.read_manifest(out)
    for name, parent in (manifest.get("parents") or {}).items():
        path = Path(parent.get("path", ""))
        if path.exists() and runs.hash_folder(path) != parent.get("sha256"):
            return f"its parent {name} ({path}) changed"
    data = out.parent / "data"
    recorded = manifest.get("data_fingerprint")
    if stage != "data" and recorded and runs.is_finished(data) and (data / "stats.json").exists():
        if json.loads((data / "stats.json").read_text()).get("fingerprint") != recorded:
            return "the data build changed"
    return None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _facts(root: Path, stages: list[str]) -> dict:
    """What the finished stages were built from, read from their manifests and saved configs (never today's cfg)."""
    from omegaconf import OmegaConf

    facts: dict = {}
    for s in stages:
        out = root / s
        if not runs.is_finished(out):
            continue
        manifest = runs.read_manifest(out)
        if s != "data" and "base_model" not in facts:
            facts.update(base_model=manifest.get("base_model"), peft_method=manifest.get("peft_method"))
        if "recipe" not in facts and (out / "config.yaml").exists():
            saved = OmegaConf.load(out / "config.yaml")
            facts.update(recipe=saved.data.recipe, scope=saved.scope.name)
    return facts


def summarize(cfg, stages: list[str], timings: dict, total: float, earlier: dict | None = None) -> str:
    earlier = earlier or {}
    root = Path(cfg.run.output_dir) / cfg.run.name
    facts = _facts(root, stages)
    lines = [f"# align pipeline: {cfg.run.name}", "",
             f"Base model `{facts.get('base_model')}`, peft `{facts.get('peft_method')}`, data "
             f"`{facts.get('recipe')}`, scope `{facts.get('scope')}` (from the stages' manifests and configs).", ""]
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
