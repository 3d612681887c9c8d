"""align's config: the schema (every option declared once, with its default, help and valid range) and composing it.

- options.py: `opt` and `Range`, how an option is declared, and `options()`/`ranges()`, how it is read back;
- schema.py: the shared sections and the root AlignConfig; stage_sections.py: each stage's section and STAGES;
- yaml_file.py: conf/config.yaml, generated from the schema (a test fails when the committed file differs).

This module composes configs the way `python -m align` does, for the CLI, scripts and tests.
"""

from hydra.core.config_store import ConfigStore

from align.config.schema import GROUPS, AlignConfig, SourceConfig  # noqa: F401 (public names)
from align.config.stage_sections import PIPELINE_STAGES, STAGES, PpoConfig  # noqa: F401

def register() -> None:
    from align.userconf import register_plugin

    ConfigStore.instance().store(name="align_schema", node=AlignConfig)
    register_plugin()


def compose(*overrides: str, set_hydra_config: bool = True):
    """The config `python -m align <overrides>` would run, for scripts and tests (outside a Hydra app).

    With set_hydra_config the Hydra runtime config is installed as well, so code that reads the user's
    overrides (the pipeline) behaves as it does on the command line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from align.userconf import check_user_configs, with_data_scope

    register()
    check_user_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("align.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=with_data_scope(list(overrides)),
                            return_hydra_config=set_hydra_config)
    if set_hydra_config:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def group_options() -> dict[str, list[str]]:
    """The options of each config group (GROUPS), the user's ./conf included, for `python -m align --help`."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("align.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return {group: loader.get_group_options(group) for group in GROUPS}


def compose_in_app(overrides: list[str]):
    """Compose `overrides` inside a running app (its config search path), or on the packaged configs outside one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=overrides)
    with initialize_config_module("align.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def stage_view(stage: str):
    """The config `python -m align stage=<stage>` would compose with this process's command-line overrides (the data
    stage reports the SFT stage's length budget)."""
    from hydra.core.hydra_config import HydraConfig

    from align.userconf import with_data_scope

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside an app without its Hydra config: the defaults
        task = []
    return compose_in_app(with_data_scope([o for o in task if not o.startswith("stage=")] + [f"stage={stage}"]))
