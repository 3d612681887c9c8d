"""How much of the machine SFT uses: the measured matmul peak (fp32 and bf16) against SFT's training FLOP rate.

Measures, in one process: the best of a few square matmuls per dtype (2 n^3 FLOP each), then the sft stage on the
main job's data and settings for --steps steps, reading its tokens per second (TRL's token count over the trainer's
runtime). Training FLOPs per token are estimated as 6 x trainable-or-not parameters for full fine-tuning and
4 x parameters for LoRA (forward 2N, backward through frozen weights 2N; the adapter's own are negligible), leaving
attention's sequence-length terms out (short rows). With shared prefixes (trainer.shared_prefix, the default) the
machine computes fewer tokens than it trains, so the rate is an effective one: the unshared computation's FLOPs on
the tokens trained; the table gives the share of padded tokens actually computed beside it. Writes the raw JSON and
prints a table:

    python scripts/bench_throughput.py                              # embedded model, 20 steps
    python scripts/bench_throughput.py --model tiny --steps 2 --out-json /tmp/t.json   # smoke run (tests)
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import bench_record


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), repeats: int = 5) -> float:
    """Best GFLOP/s of n x n @ n x n over the sizes (each timed `repeats` times after a warm-up)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = (time.perf_counter() - started) / repeats
        best = max(best, 2 * n ** 3 / seconds / 1e9)
    return best


def sft_rate(args) -> dict:
    """The sft stage for args.steps steps; its tokens/s, parameters and whether it trained every weight."""
    from align.config import compose
    from align.launch import run_stage

    with tempfile.TemporaryDirectory(prefix="align-throughput-") as out:
        m = run_stage(compose("stage=sft", f"model={args.model}", f"peft={args.peft}", "tracking=none",
                              f"run.output_dir={out}", "run.name=t", f"trainer.max_steps={args.steps}",
                              "trainer.save_steps=100000", "+trainer.extra.save_strategy=no",
                              "data.eval_fraction=0", *args.overrides))  # no eval split: training alone
    full = m["trainable_params"] == m["total_params"]
    per_token = (6 if full else 4) * m["total_params"]
    return {"tokens_per_second": m["train/tokens_per_second"], "total_params": m["total_params"],
            "trainable_params": m["trainable_params"], "flops_per_token": per_token,
            "gflops": m["train/tokens_per_second"] * per_token / 1e9,
            "s_per_step": m["train/train_runtime"] / args.steps,
            "shared_prefix_token_ratio": m.get("train/shared_prefix_token_ratio")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--peft", default="lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out-json", type=Path, default=Path("docs/bench/throughput.json"))
    p.add_argument("overrides", nargs="*", help="extra overrides for the sft run, e.g. model.cpu_bf16=false")
    args = p.parse_args()
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    sft = sft_rate(args)
    share = {k: sft["gflops"] / v for k, v in peaks.items()}
    rows = ["| measure | GFLOP/s | SFT's share |", "|---|---|---|"]
    rows += [f"| matmul peak, {k} | {v:,.1f} | {share[k]:.1%} |" for k, v in peaks.items()]
    computed = sft["shared_prefix_token_ratio"]
    rows.append(f"| sft ({args.peft}, {sft['tokens_per_second']:,.0f} tokens/s x {sft['flops_per_token'] / 1e9:.2f} "
                f"GFLOP; " + ("no shared prefixes" if computed is None else
                              f"effective: shared prefixes computed {computed:.0%} of the padded tokens")
                + f") | {sft['gflops']:,.1f} | |")
    print(bench_record.write(args.out_json, "bench_throughput.py", "\n".join(rows), threads=torch.get_num_threads(),
                             matmul_peak_gflops=peaks, sft=sft, share_of_peak=share)["table_md"])


if __name__ == "__main__":
    main()
