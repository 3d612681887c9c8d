"""Does a run's reward model rank the SFT policy's own answers the way PPO needs? (docs/benchmarks.md, round 3)

For each prompt of a scope-eval file (default: the tax_assistant dev split) the SFT policy answers twice, greedily
and with its refusal openers suppressed (how it would comply). The rm adapter scores both. For refuse prompts the
policy's own refusal should beat its forced answer; for answer prompts the reverse. Prints both rates.

    python scripts/check_reward.py run.name=<run>    # any config override; reads outputs/<run>/{sft,rm}
"""

import json
import random
import sys

import torch

from align import AlignError, models, negatives, runs
from align.config import compose
from align.data import scope
from align.evaluation.judges import REFUSED, make_judge
from align.generation import chat_generate, scope_conversations
from align.rl import ppo, reward

DEV = "data_recipes/tax_assistant/dev.jsonl"


def main(argv: list[str]) -> None:
    prompts_file = next((a.split("=", 1)[1] for a in argv if a.startswith("prompts=")), DEV)
    cfg = compose("stage=ppo", "tracking=none", *[a for a in argv if not a.startswith("prompts=")])
    sft = runs.adapter_of(runs.find_parent(cfg, ("sft",), None, needed_by="check_reward"))
    rm = runs.adapter_of(runs.find_parent(cfg, ("rm",), None, needed_by="check_reward"))
    tok = models.load_tokenizer(cfg.model)
    model = ppo.load_policy(cfg, tok, sft)
    head = reward.load_reward(model, rm)
    rows = [json.loads(line) for line in open(prompts_file)]
    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    gen = dict(max_new_tokens=cfg.ppo.max_new_tokens, batch_size=cfg.eval.batch_size)
    with ppo.use_adapter(model, ppo.POLICY):
        own, _ = chat_generate(model, tok, convs, desc="greedy", **gen)
        forced, _ = chat_generate(model, tok, convs, desc="refusal barred", **gen,
                                  begin_suppress_tokens=negatives.refusal_openers(cfg, tok))
    score = reward.CompletionReward(model, head, tok, batch_size=cfg.eval.batch_size)
    s_own = torch.tensor(score(convs, [[{"role": "assistant", "content": t}] for t in own]))
    s_forced = torch.tensor(score(convs, [[{"role": "assistant", "content": t}] for t in forced]))
    refused = make_judge("keyword").judge([r["prompt"] for r in rows], own)
    print(f"reward model {rm} on {prompts_file}, SFT policy {sft}")
    # refuse prompts the policy refuses: its own refusal vs its own forced answer
    idx = [i for i, r in enumerate(rows) if r["expected"] == "refuse" and refused[i] == REFUSED]
    print(f"refuse prompts the policy refuses: {len(idx)}; its refusal scores above its forced answer on "
          f"{(s_own[idx] > s_forced[idx]).float().mean():.3f} "
          f"(mean {s_own[idx].mean():.3f} vs {s_forced[idx].mean():.3f})")
    # answer prompts the policy answers: its own answer vs the over-refusal the rm stage trained against
    idx = [i for i, r in enumerate(rows) if r["expected"] == "answer" and refused[i] != REFUSED]
    rng = random.Random(cfg.seed)
    refusals = [[{"role": "assistant", "content": scope.unnecessary_refusal(rows[i], cfg.scope, rng)}] for i in idx]
    s_ref = torch.tensor(score([convs[i] for i in idx], refusals))
    print(f"answer prompts the policy answers: {len(idx)}; its answer scores above a refusal on "
          f"{(s_own[idx] > s_ref).float().mean():.3f} (mean {s_own[idx].mean():.3f} vs {s_ref.mean():.3f})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except AlignError as err:  # a missing run or stage: one line, not a traceback
        sys.exit(f"check_reward: {err}")
