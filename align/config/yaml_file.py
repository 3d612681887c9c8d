"""The text of conf/config.yaml, generated from the declared options (`python scripts/gen_config_yaml.py`)."""

import dataclasses
import math
import textwrap
import typing

from align.config.options import _default
from align.config.schema import GROUPS, AlignConfig

YAML_HEADER = """\
# align: the defaults every run composes. Override anything from the shell:
#   python -m align stage=dpo peft=qlora trainer.learning_rate=5e-6 run.name=exp1
# `python -m align --help` lists every option with its default, help and valid range.
#
# GENERATED from align/config/ by `python scripts/gen_config_yaml.py`: edit the options there, not here.
# Each group in the defaults list (model, peft, ...) brings its keys from conf/<group>/<option>.yaml."""

# Hydra's own settings (not options of the schema); interpolations are resolved by Hydra
HYDRA = {
    "run": {"dir": "${run.output_dir}/${run.name}/logs/${stage.name}_${now:%Y%m%d_%H%M%S}"},
    "sweep": {"dir": "${run.output_dir}/multirun/${now:%Y%m%d_%H%M%S}", "subdir": "${hydra.job.num}"},
    "job": {"chdir": False},
}

WIDTH = 120


def yaml_scalar(value) -> str:
    """One value in YAML flow style, as conf/config.yaml writes it (interpolations stay as they are)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(text: str, indent: str) -> list[str]:
    prefix = f"{indent}# "
    return textwrap.wrap(text, WIDTH, initial_indent=prefix, subsequent_indent=prefix, break_long_words=False,
                         break_on_hyphens=False)


def _yaml_section(cls, indent: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        lines += _comment(f.metadata.get("help", ""), indent)
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [f"{indent}{f.name}:", *_yaml_section(hints[f.name], indent + "  ")]
            continue
        value = _default(f)
        flow = f"{indent}{f.name}: {yaml_scalar(value)}"
        if len(flow) <= WIDTH or not isinstance(value, list):
            lines.append(flow)
        else:
            lines += [f"{indent}{f.name}:", *(f"{indent}  - {yaml_scalar(v)}" for v in value)]
    return lines


def _yaml_mapping(node: dict, indent: str) -> list[str]:
    lines = []
    for key, value in node.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_yaml_mapping(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {yaml_scalar(value)}")
    return lines


def config_yaml() -> str:
    """The text of conf/config.yaml: the defaults list, every section that no group owns, and Hydra's settings."""
    lines = [YAML_HEADER, "defaults:", "  - align_schema", "  - _self_"]
    lines += [f"  - {group}: {choice}" for group, (choice, _) in GROUPS.items()]
    hints = typing.get_type_hints(AlignConfig)
    for f in dataclasses.fields(AlignConfig):
        if f.name in GROUPS:
            continue
        lines.append("")
        lines += _comment(f.metadata.get("help", ""), "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [f"{f.name}:", *_yaml_section(hints[f.name], "  ")]
        else:
            lines.append(f"{f.name}: {yaml_scalar(_default(f))}")
    lines += ["", "hydra:", *_yaml_mapping(HYDRA, "  ")]
    return "\n".join(lines) + "\n"
