"""Batched generation (left padding) vs one prompt at a time, on the same prompts, model and machine.

    python scripts/bench_eval.py                    # embedded SmolLM2-135M, 32 held-out prompts, 32 new tokens
    python scripts/bench_eval.py --model tiny --prompts 4 --out-json /tmp/eval.json   # smoke run (tests)

Prints tokens/s for each and the speed-up (goal, issue #6: >= 4x at batch 16).
"""

import argparse
from pathlib import Path

import torch

import bench_record

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
    p.add_argument("--out-json", type=Path, default=Path("docs/bench/eval.json"))
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
    rows = [f"model={args.model}, {len(convs)} held-out prompts, {args.max_new_tokens} new tokens at most, greedy\n",
            "| mode | seconds | generated tokens | tokens/s |", "|---|---|---|---|"]
    rows += [f"| {name} | {s['seconds']:.1f} | {s['generated_tokens']} | {s['tokens_per_second']:.1f} |"
             for name, s in (("one at a time", one), (f"batched ({args.batch})", batched))]
    rows.append(f"\nspeed-up (wall time): {one['seconds'] / batched['seconds']:.2f}x")
    print(bench_record.write(args.out_json, "bench_eval.py", "\n".join(rows), settings=vars(args) | {
        "out_json": str(args.out_json)}, one_at_a_time=one, batched=batched)["table_md"])


if __name__ == "__main__":
    main()
