"""fp32 vs bf16 autocast on the CPU (model.cpu_bf16), same model, data and machine, in one process.

    python scripts/bench_bf16.py                 # embedded SmolLM2-135M: LoRA train steps and batched generation
    python scripts/bench_bf16.py --model tiny --steps 2 --prompts 8

Prints seconds per LoRA train step (batch 8, 80 tokens, the main job's SFT shape), generation tokens/s (greedy,
the main job's eval shape) and the ratios. Only CPUs with native bf16 (AVX512-BF16, AMX) gain; elsewhere
autocast is emulated, which is why model.cpu_bf16=auto checks the CPU flags.
"""

import argparse
import time

import torch

from align import models
from align.config import compose
from align.data import recipes
from align.generation import chat_generate, scope_conversations


def train_seconds(cfg, bf16: bool, steps: int, batch: int, length: int) -> tuple[float, float]:
    """Seconds per LoRA step (after one warm-up step) and the last loss, from a fixed seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = models.load_model(cfg.model, cfg.peft, "causal")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    loss = torch.tensor(0.0)
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - started) / steps, loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    cfg = compose(f"model={args.model}", "run.output_dir=/tmp/align-bench-bf16", set_hydra_config=False)
    print(f"model={args.model} native cpu bf16={models.native_cpu_bf16()} threads={torch.get_num_threads()}\n")

    rows_out = []
    for bf16 in (False, True):
        s, loss = train_seconds(cfg, bf16, args.steps, batch=8, length=80)
        rows_out.append(("train step (LoRA, 8x80)", bf16, s, f"loss after {args.steps + 1} steps {loss:.3f}"))

    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    rows = recipes.load(cfg, "scope_eval")[1][: args.prompts]
    convs = scope_conversations(cfg.scope.system_prompt, [r["prompt"] for r in rows])
    gen = {}
    for bf16 in (False, True):
        texts, stats = chat_generate(model, tokenizer, convs, args.max_new_tokens, batch_size=64, cpu_bf16=bf16)
        gen[bf16] = texts
        rows_out.append((f"generation ({len(convs)} prompts, batch 64)", bf16, stats["seconds"],
                         f"{stats['tokens_per_second']:.1f} tokens/s"))
    same = sum(a == b for a, b in zip(gen[False], gen[True]))

    print("| what | precision | seconds | note |\n|---|---|---|---|")
    for what, bf16, s, note in rows_out:
        print(f"| {what} | {'bf16 autocast' if bf16 else 'fp32'} | {s:.2f} | {note} |")
    print(f"\nspeed-up: train step {rows_out[0][2] / rows_out[1][2]:.2f}x, "
          f"generation {rows_out[2][2] / rows_out[3][2]:.2f}x; "
          f"identical greedy answers: {same} of {len(convs)}")


if __name__ == "__main__":
    main()
