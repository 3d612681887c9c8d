"""Batched generation (left padding) vs one prompt at a time, on the same prompts, model and machine.

    python scripts/bench_eval.py                    # embedded SmolLM2-135M, 32 held-out prompts, 32 new tokens
    python scripts/bench_eval.py --model tiny --prompts 16

Prints tokens/s for each and the speed-up (goal, issue #6: >= 4x at batch 16).
"""

import argparse

import torch

from align import models
from align.config import compose
from align.data import recipes
from align.generation import chat_generate, scope_conversations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    cfg = compose(f"model={args.model}", "run.output_dir=/tmp/align-bench-eval", set_hydra_config=False)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    rows = recipes.load(cfg, "scope_eval")[1]
    rows = rows[:: max(1, len(rows) // args.prompts)][: args.prompts]
    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    # greedy and a fixed budget: both runs do the same work, so tokens/s compare like for like
    torch.manual_seed(0)
    _, one = chat_generate(model, tokenizer, convs, args.max_new_tokens, batch_size=1, desc="one at a time")
    _, batched = chat_generate(model, tokenizer, convs, args.max_new_tokens, batch_size=args.batch, desc="batched")
    print(f"model={args.model} prompts={len(convs)} max_new_tokens={args.max_new_tokens}\n")
    print("| mode | seconds | generated tokens | tokens/s |\n|---|---|---|---|")
    for name, s in (("one at a time", one), (f"batched ({args.batch})", batched)):
        print(f"| {name} | {s['seconds']:.1f} | {s['generated_tokens']} | {s['tokens_per_second']:.1f} |")
    print(f"\nspeed-up (wall time): {one['seconds'] / batched['seconds']:.2f}x")


if __name__ == "__main__":
    main()
