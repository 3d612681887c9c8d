"""The config schema: the sections every run composes, and the root (AlignConfig).

Hydra validates every composed config against these dataclasses, so a typo'd key or a wrong type fails before any
model is loaded. Each option is declared once, here or in stage_sections.py, with `opt` (default, help, range). The
groups (model, peft, trainer, data, scope, tracking, stage) get their values from their conf/<group>/<option>.yaml;
a key a group file leaves out takes the default declared here.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from align.config.options import SEED, Range, above, at_least, opt, section
from align.config.stage_sections import (DpoConfig, EvalConfig, ExportConfig, GenerateConfig, GrpoConfig,
                                         KtoConfig, PipelineConfig, PpoConfig, RmConfig, SftConfig, STAGES)

# the config groups every run composes, with the option it picks unless the command line names another
GROUPS = {
    "model": ("smollm2_135m", "the base model"),
    "peft": ("lora", "the adapter method"),
    "trainer": ("default", "optimisation settings shared by the training stages"),
    "data": ("tax_scoped", "the data recipe; it brings its scope= unless one is given"),
    "scope": ("tax_assistant", "the scope card: what the assistant answers and how it declines the rest"),
    "tracking": ("wandb", "experiment tracking: wandb or none"),
    "stage": ("pipeline", "the stage to run"),
}


@dataclass
class RunConfig:
    name: str = opt("default", "groups every stage of one experiment: outputs/<run.name>/<stage>/")
    output_dir: str = opt("outputs", "where run folders live")
    overwrite: bool = opt(False, "allow replacing a finished stage's outputs")
    resume: bool = opt(False, "continue an interrupted stage from its last checkpoint")


@dataclass
class StageConfig:
    name: str = opt("pipeline", f"the stage to run: {', '.join(STAGES)}")
    init_from: Optional[str] = opt(None, "adapter or model folder the stage starts from (null = the stage's own "
                                         "choice, e.g. this run's sft adapter; see conf/stage/<name>.yaml)")


@dataclass
class ModelConfig:
    name_or_path: str = opt("align://smollm2-135m-instruct",
                            "hub id, local directory, .gguf file, or align://<embedded-name>")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit)")
    dtype: str = opt("auto", "auto = bf16 on CUDA with bf16 support, else fp32; or float32 / bfloat16 / float16")
    cpu_bf16: Any = opt("auto", "CPU only: bf16 autocast for matmuls, weights stay fp32 (auto = on CPUs with "
                                "AVX512-BF16/AMX, ~2x faster there)")
    trust_remote_code: bool = opt(False, "run code shipped with the model repo (off: only enable for repos you trust)")
    attn_implementation: Optional[str] = opt(None, "attention kernel (null = transformers' default; flash_attention_2 "
                                                   "needs CUDA)")
    chat_template: Optional[str] = opt(None, "Jinja chat template for base models that lack one (null = the "
                                             "tokenizer's own)")


@dataclass
class PeftConfig:
    method: str = opt("lora", "adapter method: lora, qlora, dora, full (and ia3, prefix, prompt, ptuning, bitfit, "
                              "freeze where supported)")
    r: int = opt(16, "LoRA rank", at_least(1, "the LoRA rank"))
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r)",
                          above(0, "LoRA's scale is lora_alpha / r; 0 switches the adapter off"))
    lora_dropout: float = opt(0.05, "dropout on the LoRA path",
                              Range(0, 1, "a probability; 1 drops every input", hi_open=True))
    target_modules: Any = opt("all-linear", "modules to adapt: all-linear or a list of module names")
    last_n_layers: Optional[int] = opt(None, "adapt only the last N transformer blocks (null = all); backward then "
                                             "stops at block N, so steps are faster",
                                       at_least(1, "how many top blocks get adapters; null = all"))
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA)")
    load_in_4bit: bool = opt(False, "load the frozen base in 4-bit with bitsandbytes (QLoRA)")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 or fp4")
    bnb_4bit_use_double_quant: bool = opt(True, "quantize the quantization constants too (saves ~0.4 bits/param)")
    num_virtual_tokens: int = opt(16, "soft-prompt length for prefix / prompt / ptuning",
                                  at_least(1, "prompt/prefix tuning needs at least one virtual token"))
    freeze_last_n: int = opt(2, "for method=freeze: train the last N transformer blocks plus the head (0 = head only)",
                             at_least(0, "blocks trained besides the head"))


@dataclass
class TrainerConfig:
    learning_rate: float = opt(2e-4, "peak learning rate",
                               above(0, "0 never moves the weights; below 0 climbs the loss"))
    max_steps: int = opt(-1, "total optimizer steps (-1 = use num_train_epochs)",
                         at_least(1, "-1 trains trainer.num_train_epochs; 0 would silently train a whole epoch",
                                  also=(-1,)))
    num_train_epochs: float = opt(1.0, "epochs when max_steps is -1",
                                  above(0, "passes over the data when trainer.max_steps=-1"))
    per_device_train_batch_size: int = opt(4, "sequences per device per step", at_least(1, "rows per step per device"))
    per_device_eval_batch_size: int = opt(8, "sequences per device per eval step",
                                          at_least(1, "rows per eval step per device"))
    gradient_accumulation_steps: int = opt(1, "steps to accumulate before an optimizer update",
                                           at_least(1, "micro-batches per optimizer step"))
    warmup_steps: float = opt(0.0, "warm-up: a number of steps, or a fraction (<1) of the total",
                              at_least(0, "below 1 a share of the steps, from 1 a number of steps"))
    lr_scheduler_type: str = opt("cosine", "linear, cosine, constant, ...")
    weight_decay: float = opt(0.0, "AdamW weight decay",
                              at_least(0, "decoupled decay toward zero; below 0 grows the weights"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm",
                               at_least(0, "gradient clipping norm; 0 turns clipping off"))
    logging_steps: int = opt(5, "log every N steps", at_least(1, "log every N steps"))
    save_steps: int = opt(50, "checkpoint every N steps (for run.resume)", at_least(1, "checkpoint every N steps"))
    save_total_limit: int = opt(2, "checkpoints kept", at_least(0, "checkpoints kept; 0 keeps all"))
    eval_steps: Optional[int] = opt(None, "evaluate every N steps (null = at the end only)",
                                    at_least(1, "evaluate every N steps; null = never"))
    optim: str = opt("adamw_torch", "HF optimizer name: adamw_torch, adamw_bnb_8bit, galore_adamw, lomo, ...")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    shared_prefix: bool = opt(True, "compute the tokens a batch's rows share (system prompt, a pair's prompt) once "
                                    "(sft, rm, dpo, kto; same loss and gradients, align/shared_prefix.py)")
    compact_lm_head: bool = opt(True, "on the CPU, TRL's fused LM head projects only trained positions, as it does "
                                      "on GPUs (same values; false = every position, TRL's CPU layout; "
                                      "align/fused_head.py)")
    max_length: int = opt(512, "longest tokenized sequence (prompt + response)", at_least(1, "tokens per row"))
    packing: bool = opt(False, "pack several short examples into one sequence (SFT; TRL packs them padding-free)")
    extra: Dict[str, Any] = opt({}, "any other transformers.TrainingArguments / TRL config field, passed through as-is")


@dataclass
class SourceConfig:
    name: str = opt("source", "a source's name in the stats table (unique)")
    path: str = opt("???", "shipped:<recipe>/<file>, a local JSONL/JSON/Parquet/CSV file (relative to the cwd), "
                           "pyrit:harm, compose:attacks or a hub dataset id")
    # "format", not "adapter": an adapter is the PEFT kind (peft.method, eval.adapter)
    format: Optional[str] = opt(None, "public-dataset format converter, mapping its columns to canonical rows "
                                      "(data_recipes/README.md; null = the file already holds canonical rows)")
    kind: str = opt("sft", "row kind: sft, preference, prompt, safety or scope_eval")
    split: str = opt("train", "train, eval, or rl (rollout prompts only)")
    count: Optional[int] = opt(None, "keep exactly N rows (sampled with the seed; upsampled if N > rows)",
                               at_least(0, "rows taken from the source"))
    weight: Optional[float] = opt(None, "or keep weight x rows (0.5 halves, 2.0 doubles); not both",
                                  at_least(0, "a multiple of the source's rows; above 1 upsamples"))
    options: Dict[str, Any] = opt({}, "hub_split, hub_config, revision, max_rows, to_sft, format options, and the "
                                      "card's drop_categories, near, optional (data_recipes/README.md)")


@dataclass
class DataConfig:
    recipe: str = opt("instructions", "recipe name, shown in logs and the stats table")
    scope: Optional[str] = opt(None, "the scope this recipe is written for: data=<recipe> brings scope=<it> unless "
                                     "scope= is given, and a build under another scope stops with one line (null = "
                                     "any scope)")
    kit: Optional[str] = opt(None, "the kit's folder: in_scope.jsonl (required: questions, with or without answers), "
                                   "near_miss.jsonl and harmful.jsonl (optional: prompts to decline in your field's "
                                   "own words), eval.jsonl (the held-out check), dev.jsonl (tuning)")
    sources: List[SourceConfig] = opt([], "where rows come from (see data_recipes/README.md for kinds, formats and "
                                          "options)")
    filters: List[Dict[str, Any]] = opt([], "filter chain applied to training rows, in order")
    train_files: List[str] = opt([], 'extra SFT JSONL files ({"messages": [...]}) for training, no recipe needed')
    eval_files: List[str] = opt([], "extra SFT JSONL files for evaluation")
    rl_files: List[str] = opt([], "rollout prompts for PPO/GRPO in the scope-eval format (split rl: prompts_train "
                                  "holds only these; e.g. data_recipes/tax_assistant/rl_prompts.jsonl)")
    dev_files: List[str] = opt([], "dev prompts in the scope-eval format, for tuning only (never trained on, never "
                                   "the reported split): the PPO chain picks its checkpoint on them "
                                   "(ppo.select_prompts); eval on them with 'eval.prompts=${data.dev_files}'")
    eval_fraction: float = opt(0.0, "hold out this fraction of training prompts as the eval split (when no eval "
                                    "source is given)",
                               Range(0, 1, "share of rows held out; 1 leaves nothing to train on", hi_open=True))
    on_bad_rows: str = opt("error", "error: stop at the first bad row (file:line); skip: skip bad rows and count them")
    rejected_source: str = opt("template", "rejected side of refuse pairs: template, or policy (the SFT policy's own "
                                           "answer where it complies; dpo, kto, rm)")
    chosen_source: str = opt("reference", "chosen side of in-scope pairs: reference, or policy (the SFT policy's own "
                                          "answer where it answers; dpo, kto, rm)")
    over_refusal_topic: str = opt("own", "topic an in-scope pair's rejected over-refusal names: own (the row's "
                                         "topic), off_scope (a random off-scope one) or mixed (either)")
    balance_cap: Optional[int] = opt(None, "default cap for the balance filter (oversample a category at most this "
                                           "many times)", at_least(1, "rows kept per cluster"))
    target_size: Optional[int] = opt(None, "default target_size for the diversity filter",
                                     at_least(1, "rows the diversity filter keeps"))
    reuse_built: bool = opt(True, "reuse outputs/<run.name>/data/ when it holds a finished build of this same config")
    max_rows: Optional[int] = opt(None, "use only the first N rows of each split (quick smoke runs; null = all)",
                                  at_least(1, "rows per split for smoke runs; null = all"))
    teacher: Optional[str] = opt(None, "answer in-scope rows that have no response: null (off), base (the run's base "
                                       "model) or any causal LM")
    teacher_max_new_tokens: int = opt(64, "longest teacher answer in tokens; answers still going at this length are "
                                          "dropped as cut", at_least(1, "tokens per teacher answer"))


@dataclass
class ScopeConfig:
    name: str = opt("none", "identifier for this scope, shown in reports; a recipe written for it says "
                            "`scope: <name>`")
    system_prompt: Optional[str] = opt(None, "system prompt used for training and evaluation conversations (short: "
                                             "every training row carries it)")
    capability: str = opt("", "short phrase naming what the assistant helps with; fills {capability} in templates")
    refusal_templates: List[str] = opt([], "refusal/redirect replies for off-scope and attack prompts; use {topic} "
                                           "and/or {capability}")
    unsafe_templates: List[str] = opt([], "firm but polite replies for harmful or illegal requests, offering the "
                                          "lawful alternative; use {capability} only")
    crisis_templates: List[str] = opt([], "replies for self-harm or crisis messages: express care, point to emergency "
                                          "help")
    topic_names: Dict[str, str] = opt({}, "maps each category slug used in the prompt files to the short description "
                                          "that fills {topic}")
    in_scope_categories: List[str] = opt([], "categories of the shared off-scope pool (shipped:pools/off_scope.jsonl) "
                                             "this assistant answers: a scoped recipe drops them from its refusal "
                                             "training (a pool source with options.drop_categories: "
                                             "${scope.in_scope_categories})")
    category_templates: Dict[str, List[str]] = opt({}, "replies for one category instead of its group's list above, "
                                                       "e.g. unsafe/weapons: [\"Sorry, I can't help with ...\"] (same "
                                                       "placeholders); categories not listed use the lists above")


@dataclass
class TrackingConfig:
    backend: str = opt("wandb", "wandb or none")
    project: str = opt("align", "W&B project")
    entity: Optional[str] = opt(None, "W&B entity (team or user; null = your default)")
    mode: str = opt("auto", "auto (online with WANDB_API_KEY, else offline), online, offline, disabled")
    log_artifacts: bool = opt(True, "upload adapters/models as W&B artifacts")
    tags: List[str] = opt([], "extra W&B tags")


@dataclass
class AlignConfig:
    run: RunConfig = section(RunConfig, "one experiment's name and folder")
    seed: int = opt(42, "seed for data shuffling, sampling and initialisation", SEED)
    stage: StageConfig = section(StageConfig, "which stage runs (conf/stage/<name>.yaml)")
    model: ModelConfig = section(ModelConfig, GROUPS["model"][1])
    peft: PeftConfig = section(PeftConfig, GROUPS["peft"][1])
    trainer: TrainerConfig = section(TrainerConfig, GROUPS["trainer"][1])
    data: DataConfig = section(DataConfig, GROUPS["data"][1])
    scope: ScopeConfig = section(ScopeConfig, GROUPS["scope"][1])
    tracking: TrackingConfig = section(TrackingConfig, GROUPS["tracking"][1])
    sft: SftConfig = section(SftConfig, "the sft stage (instruction SFT)")
    rm: RmConfig = section(RmConfig, "the rm stage (pairwise reward model)")
    dpo: DpoConfig = section(DpoConfig, "the dpo stage")
    kto: KtoConfig = section(KtoConfig, "the kto stage")
    ppo: PpoConfig = section(PpoConfig, "the ppo stage")
    grpo: GrpoConfig = section(GrpoConfig, "the grpo stage")
    eval: EvalConfig = section(EvalConfig, "the safety_eval stage (and generation settings other stages share)")
    pipeline: PipelineConfig = section(PipelineConfig, "the pipeline stage: data -> sft -> rm -> dpo|ppo -> "
                                                       "safety_eval under one run.name")
    export: ExportConfig = section(ExportConfig, "the export stage (merge an adapter into its base)")
    generate: GenerateConfig = section(GenerateConfig, "the generate stage (answer prompts with one or more "
                                                       "adapters)")

