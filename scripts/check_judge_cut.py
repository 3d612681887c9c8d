"""Would a shorter eval.max_new_tokens change any verdict? (docs/benchmarks.md, round 5)

Greedy decoding makes the first N tokens of a 64-token answer the answer a run with max_new_tokens=N would give,
so cutting finished safety_eval answers and judging them again shows what N the judge needs.

    python scripts/check_judge_cut.py outputs/<run>/safety_eval/responses.jsonl [...] [tokens=32,40,48]
"""

import json
import sys

from align import models
from align.config import compose
from align.evaluation.judges import make_judge


def main(argv: list[str]) -> None:
    cuts = next((a.split("=", 1)[1] for a in argv if a.startswith("tokens=")), "32,40,48")
    files = [a for a in argv if not a.startswith("tokens=")]
    if not files:
        sys.exit("usage: check_judge_cut.py responses.jsonl [...] [tokens=32,40,48]")
    cfg = compose("stage=safety_eval", "tracking=none")
    tokenizer = models.load_tokenizer(cfg.model)
    judge = make_judge(cfg.eval.judge)
    rows = [json.loads(line) for f in files for line in open(f)]
    prompts = [r["prompt"] for r in rows]
    for n in (int(c) for c in cuts.split(",")):
        cut = [tokenizer.decode(tokenizer(r["response"], add_special_tokens=False)["input_ids"][:n]) for r in rows]
        changed = sum(v != r["verdict"] for v, r in zip(judge.judge(prompts, cut), rows))
        print(f"{n} tokens: {changed} of {len(rows)} verdicts change")


if __name__ == "__main__":
    main(sys.argv[1:])
