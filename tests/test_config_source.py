"""Issue #31: every option is declared once, in align/config/ (default, help, range); conf/config.yaml is generated
from it and align/checks.py reads its ranges from it."""

import dataclasses
import typing

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT

from align import checks
from align.config import GROUPS, PIPELINE_STAGES, STAGES, AlignConfig
from align.config.options import options
from align.config.yaml_file import config_yaml

# numeric options without a range, and why
NO_RANGE = {
    "ppo.samples_per_prompt": "checked with ppo.rollout_batch_size in align/rl/ppo.py's check_options",
    "ppo.rm_weight": "checked with ppo.rule_weight in check_options",
    "ppo.missing_eos_penalty": "below 0 it is a bonus",
}


def test_committed_config_yaml_is_the_generated_one():
    committed = (ROOT / "conf" / "config.yaml").read_text(encoding="utf-8")
    assert committed == config_yaml(), "conf/config.yaml is stale: run python scripts/gen_config_yaml.py"


def test_generated_yaml_holds_the_declared_defaults():
    """What Hydra reads from conf/config.yaml (it overrides the schema) equals what the dataclasses declare."""
    text = config_yaml()
    loaded = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    declared = OmegaConf.to_container(OmegaConf.structured(AlignConfig), resolve=False)
    assert loaded["defaults"] == ["align_schema", "_self_", *({g: c} for g, (c, _) in GROUPS.items())]
    sections = [f.name for f in dataclasses.fields(AlignConfig) if f.name not in GROUPS]
    assert [k for k in loaded if k not in ("defaults", "hydra")] == sections
    for name in sections:
        assert loaded[name] == declared[name], name
    # interpolations come through as written: Hydra's, and the escaped one the ppo stage resolves itself
    assert loaded["hydra"]["run"]["dir"] == "${run.output_dir}/${run.name}/logs/${stage.name}_${now:%Y%m%d_%H%M%S}"
    assert "ppo.select_prompts=\\${data.dev_files}" in loaded["pipeline"]["ppo_overrides"]["ppo"]
    assert yaml.safe_load(text)["pipeline"]["ppo_overrides"]["ppo"][1] == "ppo.select_prompts=\\${data.dev_files}"
    # every key's help is in the comments (above it)
    comments = " ".join(line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# "))
    for opt in options(AlignConfig):
        if opt.key.split(".")[0] not in GROUPS:
            assert opt.help in comments, opt.key


def test_every_option_has_help_and_every_number_a_range():
    opts = list(options(AlignConfig))
    assert len(opts) > 150 and len({o.key for o in opts}) == len(opts)
    assert not [o.key for o in opts if not o.help.strip()]
    numeric = [o.key for o in opts if {int, float} & set(typing.get_args(o.type) or (o.type,))]
    assert sorted(k for k in numeric if k not in dict(checks.RANGES) and k not in NO_RANGE) == []
    assert set(NO_RANGE) <= set(numeric)


def test_checks_read_the_ranges_from_the_declarations():
    by_key = {o.key: o.range for o in options(AlignConfig) if o.range}
    assert checks.RANGES["trainer.max_steps"] is by_key["trainer.max_steps"]
    assert checks.RANGES["data.sources[].count"] is by_key["data.sources[].count"]
    assert checks.RANGES["dpo.loss_weights[]"] is by_key["dpo.loss_weights"]  # a list's range holds per item
    assert len(checks.RANGES) == len(by_key)
    assert isinstance(checks.RANGES["seed"], checks.Range)


def test_one_list_of_stages():
    assert (ROOT / "conf" / "stage").is_dir()
    assert sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml")) == sorted(STAGES)
    assert set(STAGES) <= {p.stem for p in (ROOT / "align" / "stages").glob("*.py")}
    hints = typing.get_type_hints(AlignConfig)
    overrides = typing.get_type_hints(hints["pipeline"])
    for name in ("overrides", "ppo_overrides"):
        assert tuple(f.name for f in dataclasses.fields(overrides[name])) == PIPELINE_STAGES


def test_source_format_is_the_converter_and_adapter_is_gone():
    from align.config import SourceConfig

    names = {f.name for f in dataclasses.fields(SourceConfig)}
    assert "format" in names and "adapter" not in names


@pytest.mark.parametrize("override", ["pipeline.overrides.export=[a]", "data.sources=[{name: a, adapter: b}]",
                                      "eval.max_new_token=5"])
def test_unknown_keys_still_fail_composition(override):
    from align.config import compose

    with pytest.raises(Exception, match="not in|Could not override") as err:
        compose(override, set_hydra_config=False)
    assert "not in" in str(err.value) + str(err.value.__cause__)
