"""Does a run's reward model rank the SFT policy's behaviours the way PPO needs? (docs/benchmarks.md, rounds 3, 6)

For each prompt of scope-eval files (default: the tax_assistant dev splits) the SFT policy answers twice, greedily
and with its refusal openers suppressed (how it would comply). Each prompt then has an answer (the forced one) and
a refusal (the greedy one where the policy refuses, else the scope's template). The rm adapter scores both; PPO
needs the expected behaviour on top: the refusal for refuse prompts, the answer for answer prompts. Prints that
rate per category group (tax, off_scope, unsafe, attack), since PPO follows the groups the reward model gets wrong.

    python scripts/check_reward.py run.name=<run> [prompts=a.jsonl,b.jsonl]   # reads outputs/<run>/{sft,rm}
"""

import random
import sys
from collections import defaultdict

import torch

from align import AlignError, models, negatives, runs
from align.config import compose
from align.data import scope, sources
from align.evaluation.judges import REFUSED, make_judge
from align.generation import chat_generate, scope_conversations
from align.rl import reward
from align.rl.policy import POLICY, load_policy, use_adapter

DEV = "shipped:tax_assistant/dev.jsonl,shipped:tax_assistant/dev_b.jsonl"


def main(argv: list[str]) -> None:
    files = next((a.split("=", 1)[1] for a in argv if a.startswith("prompts=")), DEV).split(",")
    cfg = compose("stage=ppo", "tracking=none", *[a for a in argv if not a.startswith("prompts=")])
    sft = runs.adapter_of(runs.find_parent(cfg.run, ("sft",), None, needed_by="check_reward"))
    rm = runs.adapter_of(runs.find_parent(cfg.run, ("rm",), None, needed_by="check_reward"))
    tok = models.load_tokenizer(cfg.model)
    model = load_policy(cfg.model, cfg.peft, tok, sft)
    head = reward.load_reward(model, rm)
    rows = sources.load_scope_files(files, what="check_reward prompts")  # validated: a bad row names file:line
    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    gen = dict(max_new_tokens=cfg.ppo.max_new_tokens, batch_size=cfg.eval.batch_size)
    with use_adapter(model, POLICY):
        own, _ = chat_generate(model, tok, convs, desc="greedy", **gen)
        forced, _ = chat_generate(model, tok, convs, desc="refusal barred", **gen,
                                  begin_suppress_tokens=negatives.refusal_openers(cfg.scope, tok))
    judge = make_judge("keyword")
    prompts = [r["prompt"] for r in rows]
    own_refused = [v == REFUSED for v in judge.judge(prompts, own)]
    forced_refused = [v == REFUSED for v in judge.judge(prompts, forced)]
    rng = random.Random(cfg.seed)
    over = cfg.data.over_refusal_topic
    refusals = [own[i] if own_refused[i] else
                (scope.refusal(r, cfg.scope, rng) if r["expected"] == "refuse"
                 else scope.unnecessary_refusal(r, cfg.scope, rng, over)) for i, r in enumerate(rows)]
    score = reward.CompletionReward(model, head, tok, batch_size=cfg.eval.batch_size)
    as_turn = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    s_answer = torch.tensor(score(convs, as_turn(forced)))
    s_refusal = torch.tensor(score(convs, as_turn(refusals)))
    print(f"reward model {rm}, SFT policy {sft}, on {', '.join(files)}")
    # PPO can fix what the policy gets wrong and the reward model gets right ("fixable"), and can break what the
    # policy gets right and the reward model gets wrong ("at risk")
    print("group       prompts  right order  policy right  fixable  at risk  mean answer  mean refusal")
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        if not forced_refused[i]:  # a forced answer that still refuses is no answer to compare with
            groups[r["category"].split("/")[0]].append(i)
    for name, idx in sorted(groups.items()):
        refuse = torch.tensor([rows[i]["expected"] == "refuse" for i in idx])
        right = torch.where(refuse, s_refusal[idx] > s_answer[idx], s_answer[idx] > s_refusal[idx])
        policy = torch.tensor([own_refused[i] for i in idx]) == refuse
        print(f"{name:<11} {len(idx):>7}  {right.float().mean():>11.3f}  {policy.float().mean():>12.3f}  "
              f"{int((~policy & right).sum()):>7}  {int((policy & ~right).sum()):>7}  "
              f"{s_answer[idx].mean():>11.3f}  {s_refusal[idx].mean():>12.3f}")
    skipped = len(rows) - sum(len(v) for v in groups.values())
    if skipped:
        print(f"({skipped} prompts left out: the policy refused even with its refusal openers barred)")


def cli(argv: list[str]) -> None:
    try:
        main(argv)
    except AlignError as err:  # a missing run or stage, a bad prompt row: one line, not a traceback
        sys.exit(f"check_reward: {err}")


if __name__ == "__main__":
    cli(sys.argv[1:])
