"""Weights & Biases tracking: one W&B run per stage, grouped by run.name, job_type = stage.

Without WANDB_API_KEY the run is offline (synced later with `wandb sync`); tracking=none turns it off.
Only the main process logs.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from align import AlignError
from align.runs import config_dict, scrub_override

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    run: object = None  # the wandb run, or None when tracking is off
    report_to: list = field(default_factory=list)  # for transformers' TrainingArguments

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    self.run.summary[k] = v

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def image(self, name: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def artifact(self, path: Path, name: str, kind: str) -> None:
        if self.run is not None and Path(path).exists():
            import wandb

            art = wandb.Artifact(name=name, type=kind)
            art.add_dir(str(path))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            mode = getattr(self.run.settings, "mode", "")
            run_dir = Path(self.run.dir).parent
            self.run.finish()
            if mode == "offline":
                log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)
            self.run = None


def start(cfg, stage: str, main_process: bool = True) -> Tracker:
    tcfg = cfg.tracking
    if tcfg.backend not in ("wandb", "none"):
        raise AlignError(f"tracking.backend: expected wandb or none, got {tcfg.backend!r}")
    if tcfg.backend == "none" or tcfg.mode == "disabled" or not main_process:
        return Tracker()
    import wandb

    mode = tcfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in ("online", "offline"):
        raise AlignError(f"tracking.mode: expected auto, online, offline or disabled, got {tcfg.mode!r}")
    root = Path(cfg.run.output_dir) / cfg.run.name
    root.mkdir(parents=True, exist_ok=True)
    # W&B records the command line in the run's metadata: it gets the redacted one (hub_token=<redacted>)
    argv, sys.argv = sys.argv, [scrub_override(a) for a in sys.argv]
    try:
        run = _init(wandb, cfg, tcfg, stage, root, mode)
    finally:
        sys.argv = argv
    return Tracker(run=run, report_to=["wandb"])


def _init(wandb, cfg, tcfg, stage: str, root: Path, mode: str):
    return wandb.init(
        project=tcfg.project,
        entity=tcfg.entity,
        group=cfg.run.name,
        job_type=stage,
        name=f"{cfg.run.name}-{stage}",
        config=config_dict(cfg),
        tags=list(tcfg.tags),
        dir=str(root),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
