"""The config schema. Hydra validates every composed config against these dataclasses,
so a typo'd key or a wrong type fails before any model is loaded."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

STAGES = ("data", "sft", "rm", "dpo", "kto", "ppo", "grpo", "safety_eval", "generate", "export", "pipeline", "new")


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "outputs"
    overwrite: bool = False
    resume: bool = False


@dataclass
class StageConfig:
    name: str = "pipeline"
    init_from: Optional[str] = None


@dataclass
class ModelConfig:
    name_or_path: str = "align://smollm2-135m-instruct"
    revision: Optional[str] = None
    dtype: str = "auto"
    cpu_bf16: Any = "auto"
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    chat_template: Optional[str] = None


@dataclass
class PeftConfig:
    method: str = "lora"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    last_n_layers: Optional[int] = None
    use_dora: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    num_virtual_tokens: int = 16
    freeze_last_n: int = 2


@dataclass
class TrainerConfig:
    learning_rate: float = 2e-4
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 0.0
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    eval_steps: Optional[int] = None
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    max_length: int = 512
    packing: bool = False
    padding_free: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    name: str = "source"
    path: str = "???"
    adapter: Optional[str] = None
    kind: str = "sft"
    split: str = "train"
    count: Optional[int] = None
    weight: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    recipe: str = "instructions"
    scope: Optional[str] = None
    kit: Optional[str] = None
    sources: List[SourceConfig] = field(default_factory=list)
    filters: List[Dict[str, Any]] = field(default_factory=list)
    train_files: List[str] = field(default_factory=list)
    eval_files: List[str] = field(default_factory=list)
    rl_files: List[str] = field(default_factory=list)
    dev_files: List[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    on_bad_rows: str = "error"
    rejected_source: str = "template"
    chosen_source: str = "reference"
    over_refusal_topic: str = "own"
    balance_cap: Optional[int] = None
    target_size: Optional[int] = None
    reuse_built: bool = True
    max_rows: Optional[int] = None
    teacher: Optional[str] = None
    teacher_max_new_tokens: int = 64


@dataclass
class ScopeConfig:
    name: str = "none"
    system_prompt: Optional[str] = None
    capability: str = ""
    refusal_templates: List[str] = field(default_factory=list)
    unsafe_templates: List[str] = field(default_factory=list)
    crisis_templates: List[str] = field(default_factory=list)
    topic_names: Dict[str, str] = field(default_factory=dict)
    in_scope_categories: List[str] = field(default_factory=list)
    category_templates: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    backend: str = "wandb"
    project: str = "align"
    entity: Optional[str] = None
    mode: str = "auto"
    log_artifacts: bool = True
    tags: List[str] = field(default_factory=list)


@dataclass
class SftConfig:
    assistant_only_loss: bool = True


@dataclass
class RmConfig:
    init: str = "sft"
    tie_epsilon: float = 1e-3
    center_rewards_coefficient: Optional[float] = None


@dataclass
class DpoConfig:
    beta: float = 0.1
    loss_type: Any = "sigmoid"
    loss_weights: Optional[List[float]] = None
    label_smoothing: float = 0.0
    precompute_ref: bool = True
    balance: bool = False


@dataclass
class KtoConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref: bool = True


@dataclass
class PpoConfig:
    rollout_batch_size: int = 8
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    num_updates: int = 20
    max_new_tokens: int = 48
    temperature: float = 0.9
    top_p: float = 1.0
    learning_rate: float = 5e-5
    value_learning_rate: Optional[float] = None
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    reward_norm: bool = True
    missing_eos_penalty: Optional[float] = 1.0
    sample_every: int = 5
    save_every: int = 10
    rule_weight: float = 0.0
    rm_weight: float = 1.0
    rule_judge: str = "classifier"
    seed: Optional[int] = None
    rule_scale: dict = field(default_factory=lambda: {"answer": 1.0, "refuse": 1.0})
    shared_critic: bool = False
    advantage_whitening: str = "token"
    samples_per_prompt: int = 1
    positive_only: bool = False
    select_prompts: List[str] = field(default_factory=list)
    select_metric: str = "os"
    mine_prompts: int = 0
    mine_samples: int = 4
    mine_max_new_tokens: int = 16


@dataclass
class GrpoConfig:
    num_generations: int = 4
    max_completion_length: int = 48
    beta: float = 0.04


@dataclass
class EvalConfig:
    adapter: Optional[str] = None
    adapter_stage: str = "auto"
    prompts: List[str] = field(default_factory=list)
    judge: str = "keyword"
    judge_model: Optional[str] = None
    max_new_tokens: int = 64
    batch_size: int = 64
    do_sample: bool = False
    compare_base: bool = True
    max_prompts: Optional[int] = None
    min_os: Optional[float] = None
    min_ar_in: Optional[float] = None
    min_rr_out: Optional[float] = None


@dataclass
class StageOverrides:
    data: List[str] = field(default_factory=list)
    sft: List[str] = field(default_factory=list)
    rm: List[str] = field(default_factory=list)
    dpo: List[str] = field(default_factory=list)
    kto: List[str] = field(default_factory=list)
    ppo: List[str] = field(default_factory=list)
    grpo: List[str] = field(default_factory=list)
    safety_eval: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    policy: str = "dpo"
    force: Any = False
    stages: Optional[List[str]] = None
    overrides: StageOverrides = field(default_factory=StageOverrides)
    # per-stage defaults that come with pipeline.policy=ppo (the rm PPO optimises against needs more training)
    ppo_overrides: StageOverrides = field(default_factory=StageOverrides)


@dataclass
class ExportConfig:
    adapter_stage: str = "auto"
    safe_serialization: bool = True


@dataclass
class GenerateConfig:
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None
    adapters: List[str] = field(default_factory=list)
    max_new_tokens: int = 96
    do_sample: bool = False


@dataclass
class AlignConfig:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 42
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    rm: RmConfig = field(default_factory=RmConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


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
