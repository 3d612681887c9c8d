"""On-policy preference sides: the SFT policy's own compliant answers to refuse prompts as the rejected side
(data.rejected_source=policy) and its own answers to in-scope prompts as the chosen side (data.chosen_source=policy).

A templated "Sure! Here's..." is off-policy: a preference stage that pushes it down barely moves what the
model really says, and a reward model trained on it learns to spot the template, not compliance, so PPO
earns reward by answering off-scope prompts in its own words. dpo, kto and rm all use these.
"""

import logging

from align.generation import chat_generate

log = logging.getLogger(__name__)


def refusal_openers(scope_cfg, tokenizer) -> list[int]:
    """First tokens of the scope card's refusal and unsafe templates (crisis replies open like ordinary answers)."""
    from align.data import scope as scope_mod

    templates = [*(scope_cfg.refusal_templates or scope_mod.DEFAULT_REFUSALS),
                 *(scope_cfg.unsafe_templates or scope_mod.DEFAULT_UNSAFE)]
    return sorted({tokenizer(t.strip(), add_special_tokens=False)["input_ids"][0] for t in templates if t.strip()})


def uses_policy(data_cfg) -> bool:
    """Whether the `data` section asks for either side of the pairs from the policy."""
    return "policy" in (data_cfg.rejected_source, data_cfg.chosen_source)


def policy_negatives(model, tokenizer, pairs: list, data_cfg, scope_cfg, eval_cfg, cpu_bf16: bool = False
                     ) -> tuple[list, dict]:
    """data.rejected_source=policy: the policy answers each refuse pair's prompt with its refusal openers
    suppressed at the first token, i.e. how it would comply; where that answer does comply (keyword judge) it
    becomes the rejected side (see scope.with_policy_rejected). The in-scope pairs' rejected refusals are
    already what a policy trained on those templates says, so both sides push on the policy's own behaviour.
    data.chosen_source=policy: the in-scope pairs' chosen side becomes the policy's own greedy answer where it
    answers (scope.with_policy_chosen). The policy writes greedily, eval.max_new_tokens at most, eval.batch_size
    prompts at a time. Returns (pairs, {metric: number of pairs swapped})."""
    from align.data.scope import refusal_openers as scope_openers, with_policy_chosen, with_policy_rejected
    from align.evaluation.judges import REFUSED, make_judge

    judge = make_judge("keyword", refusal_openers=scope_openers(scope_cfg))
    suppress = refusal_openers(scope_cfg, tokenizer)

    def write(prompts: list[list[dict]], barred: list[int] | None, desc: str) -> list[str]:
        texts, stats = chat_generate(model, tokenizer, prompts, max_new_tokens=eval_cfg.max_new_tokens,
                                     batch_size=eval_cfg.batch_size, batch_tokens=eval_cfg.batch_tokens, desc=desc,
                                     begin_suppress_tokens=barred, cpu_bf16=cpu_bf16)
        log.info("%s: %d answers at %.1f tokens/s", desc, len(texts), stats["tokens_per_second"])
        return texts

    def refused(prompt, answer):
        return judge.judge([prompt], [answer])[0] == REFUSED

    counts = {}
    if data_cfg.rejected_source == "policy":
        pairs, swapped = with_policy_rejected(
            pairs, lambda p: write(p, suppress, "on-policy rejected answers"), refused)
        log.info("on-policy negatives: the policy complied with %d of %d refuse prompts; those answers are the "
                 "rejected side, the rest keep the template", swapped, sum(1 for p in pairs if p.get("refuse")))
        counts["data/on_policy_rejected"] = swapped
    if data_cfg.chosen_source == "policy":
        pairs, kept = with_policy_chosen(pairs, lambda p: write(p, None, "on-policy chosen answers"), refused)
        log.info("on-policy positives: the policy answered %d of %d in-scope prompts; those answers are the "
                 "chosen side, the rest keep the reference answer", kept,
                 sum(1 for p in pairs if p.get("refuse") is False))
        counts["data/on_policy_chosen"] = kept
    model.train()
    return pairs, counts
