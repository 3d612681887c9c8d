"""Peak memory (max RSS) of DPO vs SFT with LoRA on the same model, batch and sequence length.

Each stage runs in its own child process (so peaks don't mix) on the same data recipe; prints a markdown
table and the DPO/SFT ratio. Goal (issue #4): DPO <= 1.3x SFT. DPO runs in three variants: as is, at half the micro-batch with
gradient accumulation 2 (same pairs per optimizer step), and with gradient checkpointing.

    python scripts/bench_memory.py                      # embedded SmolLM2-135M, batch 4, 10 steps
    python scripts/bench_memory.py --model tiny --steps 3
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


# DPO variants measured against SFT: (label, extra overrides). Every variant optimises batches of --batch pairs.
VARIANTS = {
    "dpo": [],
    "dpo-microbatch": ["trainer.per_device_train_batch_size={half}", "trainer.gradient_accumulation_steps=2"],
    "dpo-checkpointing": ["trainer.gradient_checkpointing=true"],
}


def child(label: str, args) -> None:
    from align.__main__ import quiet_libraries, run_stage
    from align.config import compose

    quiet_libraries()
    stage = "sft" if label == "sft" else "dpo"
    common = [f"model={args.model}", "tracking=none", f"run.output_dir={args.out}", "run.name=bench",
              f"trainer.per_device_train_batch_size={args.batch}", f"trainer.max_steps={args.steps}",
              "trainer.gradient_accumulation_steps=1", "trainer.gradient_checkpointing=false",
              f"trainer.max_length={args.max_length}", "trainer.save_steps=100000", f"data.max_rows={args.rows}"]
    variant = [o.format(half=max(1, args.batch // 2)) for o in VARIANTS.get(label, [])]
    if label != "sft":
        common.append("run.overwrite=true")  # each variant replaces the previous dpo folder
    started = time.time()
    run_stage(compose(f"stage={stage}", *common, *variant, *args.extra))
    seconds = time.time() - started
    print(json.dumps({"stage": label, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": seconds, "s_per_step": seconds / args.steps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=64, help="training rows used (data.max_rows)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="DPO variants to measure against SFT")
    p.add_argument("--child", choices=["sft", *VARIANTS])
    p.add_argument("--out")
    p.add_argument("extra", nargs="*", help="extra overrides for every run, e.g. dpo.precompute_ref=false")
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    out = tempfile.mkdtemp(prefix="align-bench-mem-")
    results = {}
    for label in ("sft", *args.variants.split(",")):  # every dpo variant starts from this sft adapter
        cmd = [sys.executable, __file__, "--child", label, "--out", out, "--model", args.model, "--batch",
               str(args.batch), "--steps", str(args.steps), "--max-length", str(args.max_length),
               "--rows", str(args.rows), *args.extra]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
        results[label] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"model={args.model} peft=lora batch={args.batch} max_length={args.max_length} steps={args.steps}\n")
    sft = results["sft"]
    print("| run | peak RSS (MB) | RSS / SFT | s/step | time / SFT |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['max_rss_mb']:.0f} | {r['max_rss_mb'] / sft['max_rss_mb']:.2f} | "
              f"{r['s_per_step']:.2f} | {r['s_per_step'] / sft['s_per_step']:.2f} |")
    print("\ngoal (issue #4): DPO peak RSS <= 1.30x SFT")


if __name__ == "__main__":
    main()
