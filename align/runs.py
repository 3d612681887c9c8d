"""Run folders: outputs/<run.name>/<stage>/ with config.yaml, metrics.json and manifest.json.

The manifest is written last, so a stage folder without one is incomplete. Finished outputs are never
deleted before their replacement is finished: run.overwrite=true writes beside them in <stage>.new, and
finish() swaps that in. run.resume=true continues from the newest complete checkpoint. One process at a
time writes a stage: prepare() takes outputs/<run.name>/.<stage>.lock, finish() (or the exit) releases it.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from omegaconf import OmegaConf

from align import AlignError, __version__, locks

log = logging.getLogger(__name__)

SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|access[_-]?key|(^|[_-])token$)", re.I)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "wandb", "hydra-core")
STAGING, ASIDE = ".new", ".old"  # <stage>.new: an overwrite in progress; <stage>.old: the replaced run, mid-swap
# a checkpoint is complete with its loop state and its weights (TRL's Trainer, or our PPO loop's layout)
CHECKPOINT_STATES = ("trainer_state.json", "state.json")
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                      "adapter/adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def stage_dir(run, stage: str) -> Path:
    """outputs/<run.name>/<stage> for the `run` section."""
    return Path(run.output_dir) / run.name / stage


def staging_dir(run, stage: str) -> Path:
    """Where an overwrite of a finished stage writes until finish() swaps it in."""
    out = stage_dir(run, stage)
    return out.with_name(out.name + STAGING)


def work_dir(run, stage: str) -> Path:
    """The folder a run of `stage` writes in: the stage folder, or its staging folder when that one is finished."""
    return staging_dir(run, stage) if is_finished(stage_dir(run, stage)) else stage_dir(run, stage)


def is_finished(path: Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def prepare(run, stage: str, main_process: bool = True) -> Path:
    """Take the stage's lock and return the folder this run writes in, refusing to replace a finished run
    unless asked. Nothing finished is deleted here, so a failed or interrupted overwrite keeps the old outputs."""
    final = stage_dir(run, stage)
    owner = main_process and os.environ.get("RANK", "0") == "0"  # one writer per torchrun/accelerate job
    if owner:
        locks.acquire(run, stage)
        recover_swap(final)
    out, fresh = _plan(run, stage, final)
    if owner and fresh and out.exists():
        shutil.rmtree(out)  # never finished (the manifest check above): an interrupted run asked to start over
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_can_start(run, stage: str) -> None:
    """prepare()'s refusals (a finished run without run.overwrite, an interrupted one without run.resume), read-only
    and before the stage's heavy imports, so a refused command answers in a second instead of after loading torch,
    transformers and TRL. prepare() checks again under the stage's lock."""
    _plan(run, stage, stage_dir(run, stage))


def _plan(run, stage: str, final: Path) -> tuple[Path, bool]:
    """(the folder to write in, whether to empty it first), or the one-line refusal."""
    if is_finished(final):
        staging = staging_dir(run, stage)
        if not run.overwrite:
            pending = (f"; {staging} holds an interrupted overwrite: run.overwrite=true run.resume=true continues it"
                       if last_checkpoint(staging) else "")
            raise AlignError(f"{final} holds a finished {stage} run; pass run.overwrite=true to replace it "
                             f"or choose another run.name{pending}")
        return staging, not run.resume
    if run.overwrite and not run.resume:
        return final, True
    if final.exists() and not run.resume and last_checkpoint(final) is not None:
        raise AlignError(f"{final} holds an interrupted {stage} run; pass run.resume=true to continue it "
                         f"or run.overwrite=true to start over")
    return final, False


def swap(new: Path, final: Path) -> None:
    """Replace `final` by the finished `new`: old aside, new in, old deleted. A crash between the renames is
    repaired by recover_swap() on the next prepare()."""
    old = final.with_name(final.name + ASIDE)
    shutil.rmtree(old, ignore_errors=True)  # a leftover of a swap that crashed while deleting
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    log.info("replaced %s with the new run", final)


def recover_swap(final: Path) -> None:
    new, old = final.with_name(final.name + STAGING), final.with_name(final.name + ASIDE)
    if not final.exists() and old.exists():
        back = new if is_finished(new) else old  # the new run if it finished, else the old one, whole
        back.rename(final)
        log.warning("%s: completed an interrupted swap (kept the %s run)", final, "new" if back is new else "old")
    if final.exists() and old.exists():
        shutil.rmtree(old)  # the swap had finished; only deleting the replaced run was cut short


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N folders in `folder` (a stage folder's checkpoints/), oldest first; .tmp ones excluded."""
    found = (p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit())
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: complete)."""
    ckpt = Path(ckpt)
    state = next((ckpt / s for s in CHECKPOINT_STATES if (ckpt / s).exists()), None)
    if state is None:
        return f"no {' or '.join(CHECKPOINT_STATES)}"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{state.name} is not valid JSON"
    weights = [ckpt / w for w in CHECKPOINT_WEIGHTS if (ckpt / w).exists()]
    if not weights:
        return "no weights file"
    bad = [w for w in weights if w.suffix == ".safetensors" and not _safetensors_whole(w)]
    return f"{bad[0].relative_to(ckpt)} is truncated" if bad else None


def _safetensors_whole(path: Path) -> bool:
    """A safetensors file is 8 bytes of header length, a JSON header, then the tensors the header places."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            return False
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return False
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        return False
    return size == 8 + n + end


def last_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint under out/checkpoints; broken newer ones are skipped with a warning."""
    for ckpt in reversed(checkpoints(Path(out) / "checkpoints")):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def find_parent(run, stages: tuple[str, ...] | list[str], explicit: str | None = None, needed_by: str = "") -> Path:
    """The first finished stage folder among `stages` in this run, or the explicit path."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise AlignError(f"stage.init_from: {path} does not exist")
        return path
    for stage in stages:
        if is_finished(stage_dir(run, stage)):
            return stage_dir(run, stage)
    first = stages[0]
    raise AlignError(
        f"{needed_by or 'this stage'} needs a finished {' or '.join(stages)} stage in run '{run.name}' "
        f"({stage_dir(run, first)}/manifest.json missing): run "
        f"`python -m align stage={first} run.name={run.name}` first, or set stage.init_from=PATH"
    )


def scrub(obj):
    """Drop secret-looking keys before anything is written or uploaded."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def scrub_override(text: str) -> str:
    """'key=value' overrides (alone, or comma-joined as in Hydra's override_dirname) whose key looks secret
    get their value redacted: trainer.extra.hub_token=hf_x -> trainer.extra.hub_token=<redacted>."""
    if "=" not in text:
        return text
    parts = []
    for part in text.split(","):
        key, eq, _ = part.partition("=")
        leaf = key.strip().lstrip("+~").rsplit(".", 1)[-1]
        parts.append(f"{key}=<redacted>" if eq and SECRET_KEY.search(leaf) else part)
    return ",".join(parts)


def _scrub_log(obj):
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else _scrub_log(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub_log(v) for v in obj]
    return scrub_override(obj) if isinstance(obj, str) else obj


def scrub_hydra_logs() -> list[Path]:
    """Hydra saves the composed config and the command line (.hydra/config.yaml, hydra.yaml, overrides.yaml)
    under the run's logs/ before any of our code runs; rewrite them with secrets redacted. Returns the files
    rewritten."""
    import yaml

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        files = list((Path(hc.runtime.output_dir) / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
        if hc.mode == RunMode.MULTIRUN:
            files.append(Path(hc.sweep.dir) / "multirun.yaml")
    except Exception:  # not inside a Hydra app (scripts, tests composing configs): no log files
        return []
    changed = []
    for f in files:
        if not f.is_file():
            continue
        data = yaml.safe_load(f.read_text())
        clean = _scrub_log(data)
        if clean != data:
            f.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
            changed.append(f)
    return changed


def config_dict(cfg) -> dict:
    return scrub(OmegaConf.to_container(cfg, resolve=True))


def write_json(path: Path, obj) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def hash_folder(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and "checkpoints" not in f.parts and f.name != "manifest.json":
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        return rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _world_size() -> int:
    from align.distributed import distributed_state

    return distributed_state().num_processes


def _versions() -> dict:
    out = {"align": __version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def relocate(obj, src: Path, dst: Path):
    """Paths under the staging folder, as they will read once it is swapped in."""
    if isinstance(obj, dict):
        return {k: relocate(v, src, dst) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate(v, src, dst) for v in obj]
    if isinstance(obj, str) and (obj == str(src) or obj.startswith(str(src) + os.sep)):
        return str(dst) + obj[len(str(src)):]
    return obj


def peak_gpu_memory() -> dict:
    """This process's peak CUDA memory (what torch allocated), for metrics.json; nothing without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu/peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "gpu/name": torch.cuda.get_device_name()}


def finish(out: Path, cfg, stage: str, metrics: dict, parents: dict | None = None,
           data_fingerprint: str | None = None, started: float | None = None, extra: dict | None = None) -> None:
    """Write config.yaml, metrics.json and, last, manifest.json; then swap an overwrite in and release the lock."""
    out, final = Path(out), stage_dir(cfg.run, stage)
    staged = out == staging_dir(cfg.run, stage)
    if staged:
        metrics, extra = relocate(metrics, out, final), relocate(extra, out, final)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict(cfg))))
    metrics = {**metrics, **peak_gpu_memory()}
    write_json(out / "metrics.json", metrics)
    manifest = {
        "stage": stage,
        "run_name": cfg.run.name,
        "base_model": cfg.model.name_or_path,
        "peft_method": cfg.peft.method,
        "parents": {name: {"path": str(p), "sha256": hash_folder(p)} for name, p in (parents or {}).items()},
        "data_fingerprint": data_fingerprint,
        "versions": _versions(),
        "git_revision": _git_revision(),
        "world_size": _world_size(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1) if started else None,
        **(extra or {}),
    }
    write_json(out / "manifest.json", scrub(manifest))
    if staged:
        swap(out, final)
    locks.release(cfg.run, stage)


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


# the stages whose adapter is a chat policy, most-aligned first (for adapter_stage=auto)
POLICY_STAGES = ("dpo", "ppo", "grpo", "kto", "sft")


def policy_stages(choice: str) -> tuple[str, ...]:
    if choice == "auto":
        return POLICY_STAGES
    if choice not in POLICY_STAGES:
        raise AlignError(f"adapter stage {choice!r}: expected auto or one of {', '.join(POLICY_STAGES)}")
    return (choice,)


def adapter_of(stage_path: Path) -> Path:
    """The saved adapter (or full model) inside a finished stage folder, or the folder itself."""
    for sub in ("adapter", "model"):
        if (Path(stage_path) / sub).exists():
            return Path(stage_path) / sub
    return Path(stage_path)
