"""Step time and peak memory of sft and dpo on the main job's rows: TRL as it is, then with its LM head on trained
positions only (trainer.compact_lm_head), then with shared prefixes too (trainer.shared_prefix).

The main job's own settings (conf/stage/sft.yaml, dpo.yaml: batch 8 and 4, max_length 80, its data=tax_scoped build)
for a few steps each; every stage in its own child process (its peak RSS is its own), dpo from the sft of the same
setting. Rejected sides from templates (data.rejected_source=template), so no generation runs: training alone.
Writes the raw results (JSON) and prints a markdown table:

    python scripts/bench_shared_prefix.py                     # the embedded SmolLM2-135M, 8 steps per stage
    python scripts/bench_shared_prefix.py --model tiny --steps 1 --stages sft --settings trl,shared --data instructions
"""

import argparse
import sys
import tempfile
from pathlib import Path

import bench_record
from bench_stage_memory import child, run_child

# the settings compared, each adding to the one before: trl (TRL's fused LM head as it runs on the CPU, every
# position projected; no sharing: the code before issue #30), compact (trained positions only), shared (shared
# prefixes too, the default), shared+grouped (length-grouped batches, transformers' LengthGroupedSampler: rows of
# similar length together, so less padding; trainer.extra passes it through)
SETTINGS = {"trl": ["trainer.compact_lm_head=false", "trainer.shared_prefix=false"],
            "compact": ["trainer.compact_lm_head=true", "trainer.shared_prefix=false"],
            "shared": ["trainer.compact_lm_head=true", "trainer.shared_prefix=true"],
            "shared+grouped": ["trainer.compact_lm_head=true", "trainer.shared_prefix=true",
                               "+trainer.extra.train_sampling_strategy=group_by_length"],
            # packed SFT rows, which TRL (1.16) trains padding-free: one sequence per batch, its rows told apart by
            # position ids (no padding, and no sharing: shared prefixes need rows). Its steps carry more rows, so
            # compare tokens/s. TRL refuses padding-free rows unpacked, as max_length would go unenforced
            "packed": ["trainer.compact_lm_head=true", "trainer.packing=true"]}
# SFT only: TRL's DPOTrainer keeps no input_ids column for the sampler to measure, and turns padding_free off (1.16)
STAGE_SETTINGS = {"sft": tuple(SETTINGS), "dpo": ("trl", "compact", "shared")}


def overrides(args, setting: str, stage: str, out: str) -> list[str]:
    return [f"stage={stage}", f"model={args.model}", f"data={args.data}", "tracking=none", f"run.output_dir={out}",
            f"run.name={setting}",
            *SETTINGS[setting], f"trainer.max_steps={args.steps}",
            "trainer.save_steps=100000", "+trainer.extra.save_strategy=no", "data.rejected_source=template",
            "trainer.per_device_eval_batch_size=32", "data.max_rows=400"]


def rate(result: dict) -> str:
    """Tokens per second (TRL's count of the real tokens trained, over the runtime), where the trainer counts."""
    return "n/a" if result.get("tokens_per_second") is None else f"{result['tokens_per_second']:,.0f}"


def table(results: dict) -> str:
    rows = ["| stage | setting | s/step | vs trl | tokens computed | tokens/s | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|"]
    for stage, by_setting in results.items():
        base = by_setting.get("trl", {})
        for setting, r in by_setting.items():
            if not r["ok"]:
                rows.append(f"| {stage} | {setting} | failed: {r.get('error')} | | | | |")
                continue
            ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}" if base.get("ok") else "n/a"
            share = r["shared_prefix_token_ratio"]
            rows.append(f"| {stage} | {setting} | {r['s_per_step']:.2f} | {ratio} | "
                        f"{1.0 if share is None else share:.2f} | {rate(r)} | {r['max_rss_mb']:,.0f} |")
    both = [k for k in STAGE_SETTINGS["dpo"] if all(results.get(s, {}).get(k, {}).get("ok") for s in ("sft", "dpo"))]
    if both:
        rows.append("\ndpo / sft peak RSS: " + ", ".join(
            f"{k} {results['dpo'][k]['max_rss_mb'] / results['sft'][k]['max_rss_mb']:.2f}" for k in both))
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="conf/model name (tiny for smoke runs)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--data", default="tax_scoped", help="the recipe (the main job's by default)")
    p.add_argument("--stages", default="sft,dpo", help="sft, or sft,dpo (dpo starts from the sft)")
    p.add_argument("--out-json", type=Path, default=Path("docs/bench/shared_prefix.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.overrides)
    results = {stage: {} for stage in args.stages.split(",")}
    with tempfile.TemporaryDirectory(prefix="align-shared-prefix-") as out:
        for setting in args.settings.split(","):  # sft first: dpo starts from it
            for stage in (stage for stage in results if setting in STAGE_SETTINGS[stage]):
                r = results[stage][setting] = run_child(__file__, overrides(args, setting, stage, out))
                print(f"{setting} {stage}: " + (f"{r['s_per_step']:.2f} s/step, {r['max_rss_mb']:,.0f} MB"
                      if r["ok"] else f"failed: {r['error']}"), file=sys.stderr, flush=True)
    if not any(r["ok"] for by_setting in results.values() for r in by_setting.values()):
        sys.exit("every run failed; nothing written")
    print(bench_record.write(args.out_json, "bench_shared_prefix.py", table(results),
                             settings=vars(args) | {"out_json": str(args.out_json)}, results=results)["table_md"])

if __name__ == "__main__":
    main()
