"""`python -m align stage=<name> ...`: compose the config with Hydra and run one stage."""

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from align import AlignError
from align.config import STAGES, register

log = logging.getLogger("align")
_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_stage(cfg: DictConfig) -> dict:
    name = cfg.stage.name
    if name not in STAGES:
        raise AlignError(f"stage.name: unknown stage {name!r}; choices: {', '.join(STAGES)}")
    from align import checks, locks, runs

    runs.scrub_hydra_logs()  # first: Hydra wrote the command line to logs/ before we got here
    checks.check(cfg)  # before any model loads or any stage folder is touched
    module = importlib.import_module(f"align.stages.{name}")
    if name not in ("data", "pipeline"):  # pipeline: each of its stages seeds itself here
        from align.training import seed_everything

        seed_everything(cfg.seed)  # before the model and adapter exist, so one seed gives one adapter
    try:
        return module.run(cfg)
    finally:
        locks.release_all()  # a failed stage frees its folder for the next try


@hydra.main(config_path="pkg://align.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not any(o.startswith("run.name=") and "," in o for o in sys.argv):
        # sweep jobs must not collide on one run folder (and would refuse to overwrite each other)
        cfg.run.name = f"{cfg.run.name}-{hc.job.num}"
    try:
        run_stage(cfg)
    except AlignError as exc:
        if _FULL_ERROR:
            raise
        # exit here: past this point Hydra would print its own "Error executing job" line first
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span several lines; users get one that names the key and the choices."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, MissingConfigException) and exc.options is not None:
        group = (exc.missing_cfg_file or "").rsplit("/", 1)[0]
        bad = (exc.missing_cfg_file or "").rsplit("/", 1)[-1]
        from align.userconf import config_folders

        return (f"unknown option {bad!r} for {group}=; valid choices: {', '.join(exc.options)} "
                f"(looked in {', '.join(f'{d}/{group}' for d in config_folders())})")
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        valid = _valid_keys(cause)
        return f"config key {key!r}: {msg}" + (f"; valid keys: {valid}" if valid else "")
    return " ".join(str(exc).split())


def _valid_keys(err) -> str:
    import dataclasses

    obj_type = getattr(err, "object_type", None)
    if obj_type is not None and dataclasses.is_dataclass(obj_type) and "not in" in str(err):
        return ", ".join(f.name for f in dataclasses.fields(obj_type))
    return ""


def _check_run_name_override(args: list[str]) -> None:
    """A run.name given on the command line is checked before Hydra creates its log folder under it."""
    from types import SimpleNamespace

    from align.checks import check_run_name

    names = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "run.name"]
    dirs = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "run.output_dir"]
    for name in names:
        if "," not in name:  # a sweep (a,b) is checked per job, after Hydra splits it
            check_run_name(SimpleNamespace(run=SimpleNamespace(name=name, output_dir=(dirs or ["outputs"])[-1])))


def quiet_libraries() -> None:
    """Deprecation chatter from dependencies hides the progress bars and metrics users came for."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    for name in ("httpx", "bitsandbytes", "bitsandbytes.cextension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    quiet_libraries()
    full_error = _FULL_ERROR
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us so we can print them in one line
    register()
    from align.userconf import check_user_configs, with_data_scope

    try:
        check_user_configs()  # before Hydra composes anything: it would instantiate a callback at job start
        _check_run_name_override(sys.argv[1:])  # before Hydra makes ${run.output_dir}/${run.name}/logs
    except AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_data_scope(sys.argv[1:])
    try:
        _app()
    except AlignError as exc:
        if full_error:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if full_error or not isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
