"""On-policy negatives (data.rejected_source=policy): the SFT policy's own compliant answers to refuse prompts.

A templated "Sure! Here's..." is off-policy: a preference stage that pushes it down barely moves what the
model really says, and a reward model trained on it learns to spot the template, not compliance, so PPO
earns reward by answering off-scope prompts in its own words. dpo, kto and rm all use these.
"""

import logging

from align import models
from align.generation import chat_generate

log = logging.getLogger(__name__)


def refusal_openers(cfg, tokenizer) -> list[int]:
    """First tokens of the scope's refusal and unsafe templates (crisis replies open like ordinary answers)."""
    from align.data import scope as scope_mod

    templates = [*(cfg.scope.refusal_templates or scope_mod.DEFAULT_REFUSALS),
                 *(cfg.scope.unsafe_templates or scope_mod.DEFAULT_UNSAFE)]
    return sorted({tokenizer(t.strip(), add_special_tokens=False)["input_ids"][0] for t in templates if t.strip()})


def policy_negatives(cfg, model, tokenizer, pairs: list) -> tuple[list, int]:
    """The policy answers each refuse pair's prompt with its refusal openers suppressed at the first token, i.e.
    how it would comply; where that answer does comply (keyword judge) it becomes the rejected side (see
    scope.with_policy_rejected). The in-scope pairs' rejected refusals are already what a policy trained on
    those templates says, so both sides push on the policy's own behaviour."""
    from align.data.scope import with_policy_rejected
    from align.evaluation.judges import REFUSED, make_judge

    judge = make_judge("keyword")
    suppress = refusal_openers(cfg, tokenizer)

    def write(prompts: list[list[dict]]) -> list[str]:
        texts, stats = chat_generate(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                     batch_size=cfg.eval.batch_size, desc="on-policy rejected answers",
                                     begin_suppress_tokens=suppress, cpu_bf16=models.cpu_autocast(cfg))
        log.info("on-policy negatives: %d answers at %.1f tokens/s", len(texts), stats["tokens_per_second"])
        return texts

    pairs, swapped = with_policy_rejected(
        pairs, write, lambda prompt, answer: judge.judge([prompt], [answer])[0] == REFUSED)
    model.train()
    log.info("on-policy negatives: the policy complied with %d of %d refuse prompts; those answers are the "
             "rejected side, the rest keep the template", swapped, sum(1 for p in pairs if p.get("refuse")))
    return pairs, swapped
