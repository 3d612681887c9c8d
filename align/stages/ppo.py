"""Stage ppo: PPO on one frozen base, with the SFT adapter as policy and reference and the rm stage's
adapter as reward model (align/rl/ppo.py holds the loop; its parts sit beside it in align/rl/).

Recipe: resolve sft + rm -> prompts -> base + adapters "policy", "ref", "reward" + value head
-> the rule reward's judge, when prompts carry their expected behaviour (ppo.rule_weight) -> PPO, scoring each
checkpoint on the dev prompts (ppo.select_prompts) -> the best checkpoint, or the last update
-> held-out reward of the SFT policy vs the PPO policy -> save adapter + value head -> manifest.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from align import AlignError, adapters, distributed, models, runs, tracking
from align.data import recipes, sources
from align.data.scope import refusal_openers as scope_openers
from align.evaluation import judges, metrics as scope_metrics
from align.generation import scope_conversations
from align.rl import policy, ppo, reward, rollout

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What run()'s phases share before any model loads: the process, the parents, the data, the stage folder."""

    accelerator: Any
    out: Path  # the stage folder
    sft_dir: Path
    rm_dir: Path
    tokenizer: Any
    train_rows: list
    eval_rows: list
    rule_fn: reward.RuleReward | None  # the behaviour term, when prompts carry an expected behaviour
    select_rows: list  # ppo.select_prompts' rows (empty: the last update is kept)
    select_judge: Any  # their judge (None without them)
    main: bool  # the main process: the one that logs and writes


@dataclass
class Loaded:
    """The one base with adapters "policy", "ref", "reward", the trainable part, and the reward model as a reward."""

    model: Any
    policy_value: policy.PolicyValue
    reward_fn: Callable
    counts: dict  # trainable and total parameters


def run(cfg) -> dict:
    """The phases: check, set up, load, train, keep the best, evaluate, save and finish."""
    started = time.time()
    select_rows = check_before_loading(cfg)
    setup = prepare(cfg, select_rows)
    loaded = load_models(cfg, setup)
    tracker = tracking.start(cfg, "ppo", setup.main)
    state, start = train(cfg, setup, loaded, tracker)
    selected = keep_best(cfg, setup, loaded, state, start)
    results = held_out_eval(cfg, setup, loaded)
    metrics = eval_metrics(cfg, setup, loaded, state, results, selected)
    if setup.main:
        save_outputs(cfg, setup, loaded, results, metrics, tracker, state.history, started)
    tracker.finish()
    setup.accelerator.wait_for_everyone()
    if cfg.stage.name == "ppo":
        # run on its own: close the process group (torchrun processes abort at exit on an open gloo group);
        # inside the pipeline later stages still need it
        setup.accelerator.end_training()
    metrics["seconds"] = round(time.time() - started, 1)
    return metrics


def check_before_loading(cfg) -> list:
    """The ppo.* options and ppo.select_prompts' rows (returned), before minutes of loading, not after."""
    ppo.check_options(cfg.ppo)
    policy.check_adapter_method(cfg.peft, "ppo")
    select_rows = sources.load_scope_files(cfg.ppo.select_prompts, cfg.data.on_bad_rows, "ppo.select_prompts")
    if select_rows and scope_metrics.compute_metrics([{**r, "verdict": "answered"} for r in select_rows]
                                                     )[cfg.ppo.select_metric] is None:
        raise AlignError(f"ppo.select_prompts: no rows to measure ppo.select_metric={cfg.ppo.select_metric} "
                         "(os needs in-scope and off_scope/ prompts)")
    return select_rows


def prepare(cfg, select_rows: list) -> Setup:
    """The accelerator, the sft and rm parents, the tokenizer, the prompt rows, the rule reward, the stage folder."""
    accelerator = accelerator_for(cfg)
    main = accelerator.is_main_process
    sft_parent = runs.find_parent(cfg.run, ("sft",), cfg.stage.init_from, needed_by="ppo")
    sft_dir = runs.adapter_of(policy.same_base(sft_parent, cfg.model.name_or_path))
    rm_dir = runs.adapter_of(policy.same_base(runs.find_parent(cfg.run, ("rm",), None, needed_by="ppo"),
                                              cfg.model.name_or_path))
    tokenizer = models.load_tokenizer(cfg.model)
    train_rows, eval_rows = recipes.load(cfg, "prompt", tokenizer)
    rule_fn = rule_reward(cfg, train_rows + eval_rows)
    out = runs.prepare(cfg.run, "ppo", main_process=main)
    accelerator.wait_for_everyone()
    select_judge = None
    if select_rows:
        select_judge = rule_fn.judge if rule_fn is not None else judges.make_judge(
            cfg.ppo.rule_judge, refusal_openers=scope_openers(cfg.scope))
    if main:
        log.info("ppo: %d train prompts, %d eval prompts; policy %s, reward %s", len(train_rows), len(eval_rows),
                 sft_dir, rm_dir)
    return Setup(accelerator, out, sft_dir, rm_dir, tokenizer, train_rows, eval_rows, rule_fn, select_rows,
                 select_judge, main)


def load_models(cfg, setup: Setup) -> Loaded:
    """The base with the SFT adapter as "policy" and "ref", the rm adapter as "reward", and a new value head."""
    model = policy.load_policy(cfg.model, cfg.peft, setup.tokenizer, setup.sft_dir)
    score_head = reward.load_reward(model, setup.rm_dir)
    policy.check_trainable(model)
    policy_value = policy.PolicyValue(model, policy.new_value_head(model))
    counts = adapters.param_counts(model)
    if setup.main:
        log.info("trainable params: %d of %d (%.2f%%) + value head", counts["trainable_params"],
                 counts["total_params"], 100 * counts["trainable_share"])
    return Loaded(model, policy_value, reward.rollout_reward(model, score_head, setup.tokenizer), counts)


def train(cfg, setup: Setup, loaded: Loaded, tracker) -> tuple[ppo.LoopState, dict]:
    """The SFT policy's dev rates (with ppo.select_prompts), then the PPO loop. Returns its state and those rates."""
    metric, rows = cfg.ppo.select_metric, setup.select_rows
    start = score_policy(cfg, loaded.model, setup.tokenizer, rows, setup.select_judge, setup.accelerator,
                         policy.REF) if rows else {}
    if start and setup.main:
        log.info("ppo start (SFT policy): %s", describe(start, metric, len(rows)))
    inputs = ppo.LoopInputs(
        setup.tokenizer, setup.train_rows, loaded.reward_fn, rule_fn=setup.rule_fn, seed=ppo_seed(cfg),
        max_prompt_length=cfg.trainer.max_length - cfg.ppo.max_new_tokens, max_grad_norm=cfg.trainer.max_grad_norm,
        weight_decay=cfg.trainer.weight_decay, out=setup.out, resume=cfg.run.resume,
        save_total_limit=cfg.trainer.save_total_limit, tracker=tracker, on_update=progress(cfg, setup, loaded, tracker),
    )
    return ppo.train(loaded.policy_value, inputs, cfg.ppo, setup.accelerator), start


def progress(cfg, setup: Setup, loaded: Loaded, tracker) -> Callable[[ppo.LoopState], None]:
    """After each update: at checkpoints the dev rates (ppo.select_prompts) into the record; metrics.json."""
    metric, rows = cfg.ppo.select_metric, setup.select_rows

    def on_update(state):  # metrics.json grows during training; runs.finish rewrites it at the end
        if rows and (state.update % cfg.ppo.save_every == 0 or state.update == cfg.ppo.num_updates):
            rates = score_policy(cfg, loaded.model, setup.tokenizer, rows, setup.select_judge, setup.accelerator)
            state.history[-1].update({f"select/{k}": rates[k] for k in ppo.SELECT_METRICS})
            if setup.main:
                log.info("ppo update %d: %s", state.update, describe(rates, metric, len(rows)))
                tracker.log({f"select/{k}": rates[k] for k in ppo.SELECT_METRICS if rates[k] is not None},
                            step=state.update)
        if setup.main:
            runs.write_json(setup.out / "metrics.json", {"history": state.history})

    return on_update


def keep_best(cfg, setup: Setup, loaded: Loaded, state: ppo.LoopState, start: dict) -> dict:
    """With ppo.select_prompts, the checkpoint best on the dev prompts back into the policy and value head.
    Returns the select/* metrics."""
    metric = cfg.ppo.select_metric
    best = ppo.best_update(state.history, metric)
    if best is None:
        return {"select/update": None}
    chosen = state.history[best - 1][f"select/{metric}"]
    if best != state.update:
        kept = setup.out / "checkpoints" / f"checkpoint-{best}"
        policy.load_adapter_weights(loaded.model, policy.POLICY, kept / "adapter")
        policy.load_value_head(loaded.policy_value.value_head, kept / "value_head.safetensors")
    if setup.main:
        log.info("ppo: the adapter is update %d's (%s %.3f on the dev prompts; the SFT policy's %.3f, the last "
                 "update's %.3f)", best, metric, chosen, start[metric], state.history[-1][f"select/{metric}"])
        if chosen <= start[metric]:
            log.warning("ppo: no checkpoint beat the SFT policy on ppo.select_prompts (%s %.3f <= %.3f)", metric,
                        chosen, start[metric])
    return {"select/update": best, f"select/{metric}": chosen, f"select/sft_{metric}": start[metric]}


def held_out_eval(cfg, setup: Setup, loaded: Loaded) -> dict:
    """The SFT policy (adapter "ref") vs the PPO policy, greedy, scored by the RM, each process on its shard:
    {"sft" | "ppo": {"scores", "eos", "lengths", "samples"}} over all processes."""
    from accelerate.utils import gather_object

    accelerator = setup.accelerator
    held_out = setup.eval_rows or setup.train_rows[: cfg.eval.batch_size]
    if cfg.eval.max_prompts:
        held_out = held_out[: cfg.eval.max_prompts]
    encoded = rollout.encode_prompts(setup.tokenizer, held_out, cfg.trainer.max_length - cfg.ppo.max_new_tokens)
    shard = encoded[accelerator.process_index::accelerator.num_processes]
    results = rollout.compare(loaded.model, setup.tokenizer, shard, loaded.reward_fn,
                              {"sft": policy.REF, "ppo": policy.POLICY}, cfg.ppo.max_new_tokens, cfg.eval.batch_size,
                              context=accelerator.autocast)
    return {name: {k: gather_object(v) for k, v in r.items()} for name, r in results.items()}


def eval_metrics(cfg, setup: Setup, loaded: Loaded, state: ppo.LoopState, results: dict, selected: dict) -> dict:
    """The stage's metrics: held-out comparison, rule reward where prompts expect a behaviour, training summary."""
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    history, rule_fn = state.history, setup.rule_fn
    metrics = {
        "eval/reward_sft": mean(results["sft"]["scores"]),
        "eval/reward_ppo": mean(results["ppo"]["scores"]),
        "eval/eos_rate_sft": mean(results["sft"]["eos"]),
        "eval/eos_rate_ppo": mean(results["ppo"]["eos"]),
        "eval/length_sft": mean(results["sft"]["lengths"]),
        "eval/length_ppo": mean(results["ppo"]["lengths"]),
        "eval/n_prompts": len(results["ppo"]["scores"]),
        # mean rule reward of the greedy answers (1 = all behave as their prompt expects), where prompts say
        **({f"eval/rule_{k}": mean(rule_fn.scores([s[0] for s in r["samples"]], [s[1] for s in r["samples"]]))
            for k, r in results.items()} if rule_fn is not None else {}),
        "eval/on_train_prompts": not setup.eval_rows,
        "train/updates": state.update,
        **selected,
        "train/first_reward": history[0]["reward_mean"] if history else None,
        "train/last_reward": history[-1]["reward_mean"] if history else None,
        "train/last_kl": history[-1]["kl"] if history else None,
        "train/beta": state.beta,
        "world_size": setup.accelerator.num_processes,
        **loaded.counts,
    }
    metrics["eval/reward_delta"] = metrics["eval/reward_ppo"] - metrics["eval/reward_sft"]
    if rule_fn is not None:
        log.info("ppo eval: rule reward sft %.3f -> ppo %.3f (judge %s)", metrics["eval/rule_sft"],
                 metrics["eval/rule_ppo"], cfg.ppo.rule_judge)
    log.info("ppo eval: reward sft %.3f -> ppo %.3f (delta %+.3f) on %d prompts", metrics["eval/reward_sft"],
             metrics["eval/reward_ppo"], metrics["eval/reward_delta"], metrics["eval/n_prompts"])
    return metrics


def save_outputs(cfg, setup: Setup, loaded: Loaded, results: dict, metrics: dict, tracker, history: list,
                 started: float) -> None:
    """On the main process: the policy adapter and value head, the held-out samples, the tracker's summary, and
    the manifest last."""
    out, tokenizer = setup.out, setup.tokenizer
    target = out / "adapter"
    policy.save_adapter(loaded.model, policy.POLICY, target)
    tokenizer.save_pretrained(str(target))
    policy.save_value_head(loaded.policy_value.value_head, out / "value_head.safetensors")
    # the same prompts in the same order in both lists (each process scored its own shard)
    samples = [{"prompt": s[0], "sft": s[1], "sft_score": s[2], "ppo": q[1], "ppo_score": q[2]}
               for s, q in zip(results["sft"]["samples"], results["ppo"]["samples"])]
    (out / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    tracker.table("eval_samples", ["prompt", "sft", "sft_score", "ppo", "ppo_score"],
                  [[rollout.last_user(s["prompt"]), s["sft"], s["sft_score"], s["ppo"], s["ppo_score"]]
                   for s in samples])
    tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")})
    metrics["seconds"] = round(time.time() - started, 1)
    tracker.summary(metrics)
    if cfg.tracking.log_artifacts:
        tracker.artifact(target, name=f"{cfg.run.name}-ppo", kind="model")
    runs.finish(out, cfg, "ppo", {**metrics, "history": history}, parents={"sft": setup.sft_dir, "rm": setup.rm_dir},
                data_fingerprint=recipes.fingerprint(cfg), started=started,
                extra={"output": str(target), "world_size": setup.accelerator.num_processes})


# ----------------------------------------------------------------------------------------------
# helpers: the accelerator, the seed, the rule reward, dev-prompt scores
# ----------------------------------------------------------------------------------------------


def accelerator_for(cfg):
    """Create the Accelerator first: on CPU under torchrun it must be told cpu=True to use gloo. Refuse sharded
    launches: the loop generates with the policy between updates and switches adapters on one base, which needs the
    whole base on every process (FSDP and ZeRO-3 would have to gather it for every generated token)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    distributed.refuse_sharded_launch("ppo")

    precision = "bf16" if models.cpu_autocast(cfg.model, cfg.peft) else "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # an earlier run in this process (tests, a notebook) fixed another precision; the state is a singleton
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps)


def ppo_seed(cfg) -> int:
    """ppo.seed varies the rollouts (prompt order, sampling) of one data build; the top-level seed would rebuild it."""
    return cfg.seed if cfg.ppo.seed is None else int(cfg.ppo.seed)


def rule_reward(cfg, rows: list):
    """The behaviour term (align/rl/reward.py's RuleReward) when prompts carry an expected behaviour: in the
    reward with weight ppo.rule_weight, and logged as rule_mean even at weight 0."""
    if not cfg.ppo.rule_weight and not any(r.get("expected") for r in rows):
        return None
    judge = judges.make_judge(cfg.ppo.rule_judge, refusal_openers=scope_openers(cfg.scope))
    return reward.RuleReward(judge, rows)


def score_policy(cfg, model, tokenizer, rows: list, judge, accelerator, adapter: str = policy.POLICY) -> dict:
    """Greedy answers of one adapter (the policy, or "ref": the SFT start) to scope-eval rows, judged: the scope
    rates (align/evaluation/metrics.py), on every process. Why: PPO's answer rate swung 10-30 points between
    checkpoints 5 updates apart, so the last update is a draw (docs/benchmarks.md, round 12)."""
    from accelerate.utils import gather_object

    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    # no length cap: a dropped dev prompt would shift every answer onto the wrong row
    encoded = rollout.encode_prompts(tokenizer, [{"prompt": c} for c in convs], max_prompt_length=10**9)
    mine = list(range(accelerator.process_index, len(encoded), accelerator.num_processes))
    with accelerator.autocast():  # rollout.evaluate, not chat_generate: eval mode would break QLoRA training after it
        answers = rollout.evaluate(model, tokenizer, [encoded[i] for i in mine], None, adapter,
                               cfg.eval.max_new_tokens, cfg.eval.batch_size)["samples"]
    texts = dict(gather_object([(i, a[1]) for i, a in zip(mine, answers)]))
    responses = [texts[i] for i in range(len(rows))]
    verdicts = judge.judge([r["prompt"] for r in rows], responses)
    return scope_metrics.compute_metrics([{**r, "verdict": v} for r, v in zip(rows, verdicts)])


def describe(rates: dict, metric: str, n: int) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"{metric} {fmt(rates[metric])} on {n} dev prompts "
            f"(AR_in {fmt(rates['ar_in'])}, RR_out {fmt(rates['rr_out'])})")
