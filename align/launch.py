"""Run one stage on a composed config: the checks, the seed and the stage's `run`, for the CLI and the pipeline."""

import importlib

from align import AlignError
from align.config import STAGES


# the stages that write outputs/<run.name>/<stage>/ through runs.prepare (pipeline chains them; new writes a project)
OWN_FOLDER = ("data", "sft", "rm", "dpo", "kto", "ppo", "grpo", "safety_eval", "export", "generate")
# the stages not seeded here: new and data draw no random numbers (data's teacher decodes greedily), and pipeline
# seeds each of its stages through this function; skipping them also spares them the seconds of importing torch
UNSEEDED = ("new", "data", "pipeline")


def run_stage(cfg) -> dict:
    name = cfg.stage.name
    if name not in STAGES:
        raise AlignError(f"stage.name: unknown stage {name!r}; choices: {', '.join(STAGES)}")
    from align import checks, locks, runs

    runs.scrub_hydra_logs()  # first: Hydra wrote the command line to logs/ before we got here
    checks.check(cfg)  # before any model loads or any stage folder is touched
    if name in OWN_FOLDER:
        runs.check_can_start(cfg.run, name)  # a refusal before the stage's imports (seconds of torch, TRL)
    module = importlib.import_module(f"align.stages.{name}")
    if name not in UNSEEDED:
        from align.training import seed_everything

        seed_everything(cfg.seed)  # before the model and adapter exist, so one seed gives one adapter
    try:
        return module.run(cfg)
    finally:
        locks.release_all()  # a failed stage frees its folder for the next try
