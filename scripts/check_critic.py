"""What has a finished PPO run's critic learned about the decision a scoped assistant makes in its first tokens?
(docs/benchmarks.md, round 10)

For every prompt of the run's prompts_eval split, the PPO policy and its value head read the prompt followed by
an answer opener and, separately, a refusal opener. Printed per expected behaviour: the value of the prompt, and
the value after each opener. A critic that values the answer opener above the refusal opener on refuse prompts
too has learned "answers earn more" across prompts, not per prompt; with ppo.lam < 1 its TD errors at the
opener then reward answering everywhere, since the final score reaches the first token only as lam^length.

    python scripts/check_critic.py run.name=<run> [answer="In the US,"] [refusal="Sorry, I can"]
"""

import sys

import torch

from align import AlignError, models, runs
from align.config import compose
from align.data import recipes
from align.rl import policy


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if a.startswith(("answer=", "refusal=")))
    openers = {"answer": opts.get("answer", "In the US,"), "refusal": opts.get("refusal", "Sorry, I can")}
    cfg = compose("stage=ppo", "tracking=none", *[a for a in argv if not a.startswith(("answer=", "refusal="))])
    run_ppo = runs.find_parent(cfg.run, ("ppo",), None, needed_by="check_critic")
    sft = runs.adapter_of(runs.find_parent(cfg.run, ("sft",), None, needed_by="check_critic"))
    tok = models.load_tokenizer(cfg.model)
    _, rows = recipes.load(cfg, "prompt", tok)  # the run's data folder when it matches the config, else rebuilt
    model = policy.load_policy(cfg.model, cfg.peft, tok, sft)
    policy.load_adapter_weights(model, policy.POLICY, run_ppo / "adapter")
    head = policy.new_value_head(model)
    policy.load_value_head(head, run_ppo / "value_head.safetensors")
    critic = policy.PolicyValue(model, head)
    values = {"answer": [], "refuse": []}
    with torch.no_grad(), policy.use_adapter(model, policy.POLICY):
        for row in rows:
            if row.get("expected") not in values:
                continue
            start = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            out = []
            for text in openers.values():
                enc = tok(start + text, return_tensors="pt", add_special_tokens=False)
                n = len(tok(text, add_special_tokens=False)["input_ids"])
                _, v = critic(enc["input_ids"], enc["attention_mask"], n)
                out.append((v[0, 0].item(), v[0, -1].item()))  # before the opener, after it
            values[row["expected"]].append((out[0][0], out[0][1], out[1][1]))
    print(f"critic of {run_ppo}; openers {openers}")
    print("expected  prompts  V(prompt)  V(after answer opener)  V(after refusal opener)")
    for expected, v in values.items():
        if v:
            t = torch.tensor(v).mean(0)
            print(f"{expected:<8}  {len(v):>7}  {t[0]:>9.3f}  {t[1]:>22.3f}  {t[2]:>23.3f}")


def cli(argv: list[str]) -> None:
    try:
        main(argv)
    except AlignError as err:  # a missing run or stage: one line, not a traceback
        sys.exit(f"check_critic: {err}")


if __name__ == "__main__":
    cli(sys.argv[1:])
