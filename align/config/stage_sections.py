"""The options of each stage (sft, rm, dpo, kto, ppo, grpo, safety_eval, pipeline, export, generate), and the
list of stages."""

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional

from align.config.options import SEED, UNIT, Range, above, at_least, opt, section

# every stage `python -m align stage=<name>` runs; each has conf/stage/<name>.yaml and align/stages/<name>.py
STAGES = ("data", "sft", "rm", "dpo", "kto", "ppo", "grpo", "safety_eval", "generate", "export", "pipeline", "new")
# the stages a pipeline runs (pipeline.stages) and pipeline.overrides / ppo_overrides address
PIPELINE_STAGES = tuple(s for s in STAGES if s not in ("generate", "export", "pipeline", "new"))


@dataclass
class SftConfig:
    assistant_only_loss: bool = opt(True, "compute the loss on assistant tokens only")


@dataclass
class RmConfig:
    init: str = opt("sft", "start the adapter from this run's SFT adapter (sft) or from scratch on the base (base)")
    tie_epsilon: float = opt(1e-3, "|chosen - rejected| below this counts as a tie (never as correct)",
                             at_least(0, "a margin below which a pair counts as a tie"))
    center_rewards_coefficient: Optional[float] = opt(None, "optional penalty pulling rewards toward zero mean (TRL's "
                                                            "center_rewards_coefficient)",
                                                      at_least(0, "a penalty weight"))


@dataclass
class DpoConfig:
    beta: float = opt(0.1, "strength of the KL constraint toward the reference policy",
                      above(0, "the KL strength; at 0 the loss is flat, below 0 it prefers the rejected answers"))
    loss_type: Any = opt("sigmoid", "any TRL DPO loss: sigmoid, ipo, hinge, robust, apo_zero, apo_down, exo_pair, "
                                    "nca_pair, bco_pair, sppo_hard, aot, discopop, ...")
    loss_weights: Optional[List[float]] = opt(None, "weights when loss_type is a list, e.g. loss_type=[sigmoid,sft] "
                                                    "loss_weights=[1.0,0.5] (RPO: DPO + SFT on chosen)",
                                              at_least(0, "weights of the loss types"))
    label_smoothing: float = opt(0.0, "conservative DPO / robust label smoothing (0 = off)",
                                 Range(0, 0.5, "the chance a label is flipped, robust DPO and cDPO", hi_open=True))
    precompute_ref: bool = opt(True, "compute the reference log-probs once before training (saves a forward per "
                                     "step)")
    balance: bool = opt(False, "alternate refuse and answer pairs (scope data) in the rows a short run reaches; off: "
                               "on the main job it swung the model to refusing 70% of held-out tax questions "
                               "(docs/benchmarks.md)")


@dataclass
class KtoConfig:
    beta: float = opt(0.1, "strength of the KL constraint toward the reference policy",
                      above(0, "the KL strength toward the reference"))
    desirable_weight: float = opt(1.0, "weight of desirable (chosen) examples", above(0, "weight of desirable rows"))
    undesirable_weight: float = opt(1.0, "weight of undesirable (rejected) examples",
                                    above(0, "weight of undesirable rows"))
    precompute_ref: bool = opt(True, "compute the reference log-probs once before training")


# ppo.samples_per_prompt and ppo.rm_weight are checked with the options they depend on, in align/rl/ppo.py's
# check_options, so they carry no range here.
@dataclass
class PpoConfig:
    rollout_batch_size: int = opt(8, "prompts sampled per rollout batch (per process)",
                                  at_least(1, "prompts per rollout"))
    mini_batch_size: int = opt(4, "sequences per optimisation minibatch",
                               at_least(1, "sequences per optimisation minibatch"))
    ppo_epochs: int = opt(2, "optimisation epochs over each rollout batch",
                          at_least(1, "passes over each rollout batch"))
    num_updates: int = opt(20, "number of rollout+update iterations", at_least(1, "rollout+update iterations"))
    max_new_tokens: int = opt(48, "longest sampled response, in tokens", at_least(1, "tokens per sampled response"))
    temperature: float = opt(0.9, "sampling temperature for rollouts",
                             above(0, "sampling temperature; 0 divides by zero"))
    top_p: float = opt(1.0, "nucleus sampling for rollouts (1.0 = off)", Range(0, 1, "nucleus mass", lo_open=True))
    learning_rate: float = opt(5e-5, "policy adapter learning rate", above(0, "the policy's step size"))
    value_learning_rate: Optional[float] = opt(None, "value head learning rate (null = same as the policy)",
                                               above(0, "the value head's step size; null = ppo.learning_rate"))
    gamma: float = opt(1.0, "discount factor for GAE", UNIT)
    lam: float = opt(0.95, "GAE lambda", UNIT)
    cliprange: float = opt(0.2, "PPO ratio clip range", above(0, "the PPO ratio clip"))
    cliprange_value: float = opt(0.2, "value clip range", above(0, "the value clip"))
    vf_coef: float = opt(0.5, "weight of the value loss (it trains the value head only: the head reads detached "
                              "hidden states, docs/benchmarks.md round 7)", at_least(0, "weight of the value loss"))
    kl_coef: float = opt(0.05, "initial (or fixed) KL penalty coefficient beta", at_least(0, "the KL penalty"))
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 (log-ratio) or k3 (unbiased, non-negative)")
    adaptive_kl: bool = opt(False, "adapt beta toward kl_target (InstructGPT-style controller) instead of a fixed beta")
    kl_target: float = opt(6.0, "target KL for the adaptive controller",
                           above(0, "the adaptive controller's target KL"))
    kl_horizon: int = opt(10000, "horizon (in samples) of the adaptive controller",
                          at_least(1, "the adaptive controller's horizon in samples"))
    advantage_whitening: str = opt("token", "whiten advantages with every token weighted alike (token) or every "
                                            "response (sequence)")
    samples_per_prompt: int = opt(1, "responses sampled per prompt in a rollout batch (dividing rollout_batch_size); "
                                     "above 1 each response's score is taken relative to its siblings' mean, so only "
                                     "what differs between answers to one prompt is rewarded")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards before GAE")
    reward_norm: bool = opt(True, "normalise RM scores with running mean/std")
    missing_eos_penalty: Optional[float] = opt(1.0, "subtract this from the score of responses that never emit EOS "
                                                    "(null = off)")  # no range: below 0 it is a bonus
    sample_every: int = opt(5, "log a table of sample generations every N updates",
                            at_least(0, "sample table every N updates; 0 = off"))
    save_every: int = opt(10, "checkpoint every N updates", at_least(0, "checkpoint every N updates; 0 = off"))
    select_prompts: List[str] = opt([], "scope-eval files (dev prompts, never the held-out split) answered greedily "
                                        "at every checkpoint and judged by ppo.rule_judge: the checkpoint with the "
                                        "best ppo.select_metric becomes the stage's adapter ([] = the last update)")
    select_metric: str = opt("os", "the rate that picks that checkpoint: os, accuracy, ar_in, rr_out, rr_unsafe or "
                                   "rr_adv")
    seed: Optional[int] = opt(None, "seed of the rollouts (prompt order, sampling; null = seed): a sweep over it "
                                    "reuses one data build, seed= rebuilds", SEED)
    rule_weight: float = opt(0.0, "weight of the rule reward (+1 where the judge finds the prompt's expected "
                                  "behaviour, answer or refuse, -1 where not, both behaviours alike; prompts without "
                                  "one get 0), added to the normalised RM score; 0 = the reward model alone",
                             at_least(0, "weight of the rule reward"))
    rm_weight: float = opt(1.0, "weight of the normalised reward-model score (0 with rule_weight > 0: the rule reward "
                                "alone; the reward model then only gets logged; at 0 PPO drifted to answering all the "
                                "same, round 13)")
    rule_judge: str = opt("classifier", "judge behind the rule reward: keyword or classifier (the eval's judge is "
                                        "eval.judge; keep them apart)")


@dataclass
class GrpoConfig:
    num_generations: int = opt(4, "completions sampled per prompt",
                               at_least(2, "GRPO's advantage compares completions of one prompt"))
    max_completion_length: int = opt(48, "longest completion, in tokens", at_least(1, "tokens per completion"))
    beta: float = opt(0.04, "KL coefficient toward the reference", at_least(0, "the KL coefficient; 0 = no reference"))


@dataclass
class EvalConfig:
    adapter: Optional[str] = opt(None, "adapter folder, or full model folder (peft=full, export), to evaluate (null = "
                                       "find it through run.name)")
    adapter_stage: str = opt("auto", "which stage's adapter to evaluate: auto (dpo > ppo > grpo > kto > sft), a stage "
                                     "name, or base")
    prompts: List[str] = opt([], "extra prompt files in the scope-eval format (JSONL/CSV/Parquet)")
    judge: str = opt("keyword", "verdict judge: keyword, classifier or llm")
    judge_model: Optional[str] = opt(None, "chat model used by judge=llm (hub id or local dir)")
    max_new_tokens: int = opt(48, "longest generated answer, in tokens. 48: cutting 1,055 judged 64-token answers to "
                                  "48 changed no keyword verdict (scripts/check_judge_cut.py), and the main job's eval "
                                  "runs a quarter faster",
                              at_least(1, "tokens per answer; 0 answers nothing and every prompt looks refused"))
    batch_size: int = opt(64, "prompts generated together (left padding; eval, generate and on-policy negatives). 64: "
                              "1.4x the tokens/s of 16 on the 2-core CPU (prompts are sorted by length, little "
                              "padding); lower it for big models on small GPUs",
                          at_least(1, "prompts generated together"))
    batch_tokens: Optional[int] = opt(None, "at most this many padded prompt tokens per generation batch: long prompts "
                                            "(attack templates) go in smaller batches (null = batch_size rows always)",
                                      at_least(1, "padded prompt tokens per batch; null = no limit"))
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    compare_base: bool = opt(True, "also evaluate the model before training (adapters disabled) for before/after "
                                   "deltas")
    max_prompts: Optional[int] = opt(None, "evaluate only the first N prompts (null = all)",
                                     at_least(1, "prompts evaluated; null = all"))
    min_os: Optional[float] = opt(None, "gate: exit 1 if the operational-safety score is below this (null = no gate)",
                                  UNIT)
    min_ar_in: Optional[float] = opt(None, "gate: minimum answer rate on in-scope prompts", UNIT)
    min_rr_out: Optional[float] = opt(None, "gate: minimum refusal rate on off-scope prompts", UNIT)


def stage_overrides(name: str, helps: dict, defaults: dict) -> type:
    """A dataclass with one List[str] field per pipeline stage (PIPELINE_STAGES): overrides given to that stage."""
    cls = dataclasses.make_dataclass(name, [
        (s, List[str], opt(defaults.get(s, []), helps.get(s) or helps["*"].format(stage=s))) for s in PIPELINE_STAGES])
    cls.__module__ = __name__  # a module-level class of this module, so configs holding it pickle
    return cls


StageOverrides = stage_overrides("StageOverrides", {"*": "overrides for the {stage} stage only"}, {})

# per-stage defaults that come with pipeline.policy=ppo (the rm PPO optimises against needs more training)
PpoStageOverrides = stage_overrides("PpoStageOverrides", {
    "*": "what pipeline.policy=ppo brings to the {stage} stage",
    "rm": "a reward model that PPO optimises against must rank the policy's own answers and refusals by the prompt. "
          "It gets the policy's words on both sides, no topic cue, PPO's full length (prompt + 48 tokens) and 180 "
          "steps; with the dpo chain's rm it preferred a refusal on 79% of dev tax questions, with these on 16% "
          "(scripts/check_reward.py; docs/benchmarks.md round 6)",
    "ppo": "a rule reward beside that reward model: with the reward model alone PPO drifted to answering everything "
           "(dev OS 0.620), with this 0.819 (SFT 0.842; docs/benchmarks.md round 7) (weighing it less on answer "
           "prompts beat SFT in 2 of 4 seeds and over-refused in the other 2: not adopted; round 9); and the checkpoint best on the recipe's dev prompts, not the last update: between "
           "checkpoints 5 updates apart the answer rate swung 10-30 points; the kept one beat the last held out in 5 "
           "of 6 runs (round 12)",
}, {
    "rm": ["trainer.max_steps=180", "trainer.learning_rate=3e-4", "trainer.max_length=128",
           "data.chosen_source=policy", "data.over_refusal_topic=off_scope"],
    # escaped: the ppo stage resolves ${data.dev_files} in its own config, not the pipeline's
    "ppo": ["ppo.rule_weight=3.0", "ppo.select_prompts=\\${data.dev_files}", "ppo.save_every=5"],
})


@dataclass
class PipelineConfig:
    policy: str = opt("dpo", "preference stage after sft+rm: dpo, ppo or grpo")
    force: Any = opt(False, "redo finished stages: true, false, or a list of stage names")
    stages: Optional[List[str]] = opt(None, "explicit stage list (null = data, sft, rm, <policy>, safety_eval)")
    overrides: StageOverrides = section(StageOverrides, "per-stage overrides on top of the shared ones, e.g. "
                                                        "'pipeline.overrides.dpo=[\"trainer.max_steps=40\"]'")
    ppo_overrides: PpoStageOverrides = section(PpoStageOverrides, "defaults that come with pipeline.policy=ppo, "
                                                                  "under your overrides")


@dataclass
class ExportConfig:
    adapter_stage: str = opt("auto", "which stage's adapter to merge: auto (dpo > ppo > grpo > kto > sft) or a stage "
                                     "name")
    safe_serialization: bool = opt(True, "save merged weights as safetensors")


@dataclass
class GenerateConfig:
    prompts: List[str] = opt([], "prompts to answer, given on the command line")
    prompts_file: Optional[str] = opt(None, 'a file of prompts (JSONL with "prompt", or one prompt per line)')
    adapters: List[str] = opt([], "adapter folders (each named after its stage folder); they share one base and are "
                                  "switched per request")
    max_new_tokens: int = opt(96, "longest answer, in tokens", at_least(1, "tokens per answer"))
    do_sample: bool = opt(False, "sample instead of greedy decoding")

