"""`python -m align stage=<name> ...`: compose the config with Hydra and run one stage."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from align import AlignError
from align.config import register
from align.launch import run_stage

log = logging.getLogger("align")
_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


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


HELP_HEAD = """\
usage: python -m align [stage=<name>] [<group>=<option> ...] [<key>=<value> ...]

Runs one stage (by default the pipeline: data -> sft -> rm -> dpo|ppo -> safety_eval) on the config composed from
conf/config.yaml, one option of each group below and the command line. --cfg job prints that config, --multirun (-m)
sweeps comma-separated values, --hydra-help shows Hydra's own flags. `python -m align <overrides> --help` shows the
values those overrides give."""


def _shown(value, width: int = 60) -> str:
    from align.config.yaml_file import yaml_scalar

    text = yaml_scalar(value)
    if len(text) <= width:
        return text
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    return text[:width - 3] + "..."


def help_text(overrides: list[str]) -> str:
    """Every option of align/config/ (key, value, valid range, help) and every config group's options, as
    `overrides` compose them; when they cannot be composed (a sweep, a typo), the declared defaults."""
    import textwrap

    from omegaconf import OmegaConf

    from align.checks import describe
    from align.config import GROUPS, AlignConfig, compose, group_options
    from align.config.options import list_item, options

    note = ""
    try:
        cfg = compose(*overrides, set_hydra_config=True)
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices)
        raw = OmegaConf.to_container(cfg, resolve=False)
    except Exception as exc:  # noqa: BLE001 - help still lists the options
        choices, raw = {group: choice for group, (choice, _) in GROUPS.items()}, None
        note = f"note: the command line did not compose ({_one_line(exc)}); the values below are the declared defaults"
    lines = [HELP_HEAD, "", "Config groups (<group>=<option>; * = the one composed):"]
    for group, found in group_options().items():
        shown = [f"*{o}" if o == choices.get(group) else o for o in found]
        lines += [f"  {group}: {', '.join(shown)}", f"      {GROUPS[group][1]}"]
    lines += ["", *([note] if note else []), "Options (<key>=<value>: the value composed, its valid range, then what "
              "it does):"]
    missing = object()
    for opt in options(AlignConfig):
        value = opt.default
        if raw is not None and "[]" not in opt.key:
            node = raw
            for part in opt.key.split("."):
                node = node.get(part, missing) if isinstance(node, dict) else missing
            value = opt.default if node is missing else node
        each = "each " if opt.range and list_item(opt.type) is not None else ""  # a list's range holds per item
        notes = [f"range: {each}{describe(opt.range)}"] if opt.range else []
        if value != opt.default:
            notes.append(f"declared default: {_shown(opt.default)}")
        lines.append(f"  {opt.key} = {_shown(value)}" + (f"  ({'; '.join(notes)})" if notes else ""))
        lines += textwrap.wrap(opt.help, 120, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def _help_requested(args: list[str]) -> list[str] | None:
    """The overrides of a `--help`/`-h` command line (Hydra's own parser reads it), else None."""
    if "--help" not in args and "-h" not in args:
        return None
    from hydra._internal.utils import get_args_parser

    return list(get_args_parser().parse_args(args).overrides)


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
    overrides = _help_requested(sys.argv[1:])
    if overrides is not None:  # ours, not Hydra's: every option with its help and range (--hydra-help is Hydra's)
        print(help_text(overrides))
        return
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
