"""Benchmark: align's PPO (align/rl/ppo.py) against the last TRL PPO (trl==1.12.0, trl.experimental.ppo).

Same base model, same LoRA, same prompts, rollout/minibatch sizes, response length, PPO epochs and number
of updates. Each implementation runs in its own child process; the parent reads the child's peak RSS
from os.wait4 (getrusage of that child) and the child reports seconds per update. TRL 1.12 is installed
once into a separate virtualenv (only trl differs: torch, transformers, peft, accelerate and datasets are
pinned to this environment's versions).

    python scripts/bench_ppo.py                      # tiny model
    python scripts/bench_ppo.py --model smollm2      # the embedded SmolLM2-135M-Instruct

Shapes of the two setups (what each keeps in memory):
  align: one base + LoRA adapters "policy", "ref", "reward" + two Linear heads (value, score)
  TRL:   policy base + LoRA (reference = adapters disabled), a reward model and a value model, each a
         full AutoModelForSequenceClassification (TRL trains the value model in full)
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "align://tiny-llama", "smollm2": "align://smollm2-135m-instruct"}
TRL_VERSION = "1.12.0"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


# ----------------------------------------------------------------------------------------------
# shared inputs: base folder, an "SFT" adapter (fresh LoRA), a reward-model adapter, prompts
# ----------------------------------------------------------------------------------------------


def prepare(work: Path, model_name: str, n_prompts: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from align import models

    base = models.resolve(MODELS[model_name])
    tok = AutoTokenizer.from_pretrained(base)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not (work / "sft" / "adapter_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base)
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).save_pretrained(work / "sft")
    if not (work / "rm_merged" / "config.json").exists():
        rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        rm.config.pad_token_id = tok.pad_token_id
        rm = get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", **LORA))
        with torch.no_grad():  # an untrained but non-trivial reward model: speed and memory do not depend on it
            for name, p in rm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        rm.save_pretrained(work / "rm")
        merged = rm.merge_and_unload()  # TRL 1.12's PPO takes a full reward model
        merged.save_pretrained(work / "rm_merged")
        tok.save_pretrained(work / "rm_merged")
    rows = [json.loads(line) for line in (ROOT / "data_recipes/instructions/train.jsonl").read_text().splitlines()]
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"][:1] for r in rows][:n_prompts]
    (work / "prompts.json").write_text(json.dumps(prompts))
    return {"base": base, "sft": str(work / "sft"), "rm": str(work / "rm"), "rm_merged": str(work / "rm_merged"),
            "prompts": str(work / "prompts.json")}


# ----------------------------------------------------------------------------------------------
# the two children
# ----------------------------------------------------------------------------------------------


def child_align(a: dict) -> dict:
    import torch
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from align import models
    from align.config import PpoConfig
    from align.rl import policy, ppo, reward

    torch.manual_seed(0)
    cfg = OmegaConf.create({"model": {"name_or_path": a["base"], "revision": None, "dtype": "float32",
                                      "trust_remote_code": False, "attn_implementation": None},
                            "peft": {"method": "lora", "load_in_4bit": False}})
    tok = models.load_tokenizer(OmegaConf.create({"name_or_path": a["base"], "revision": None,
                                                  "trust_remote_code": False, "chat_template": None}))
    model = policy.load_policy(cfg.model, cfg.peft, tok, a["sft"])
    score_head = reward.load_reward(model, a["rm"])
    pv = policy.PolicyValue(model, policy.new_value_head(model))
    pcfg = PpoConfig(rollout_batch_size=a["batch"], mini_batch_size=a["mini"], ppo_epochs=a["epochs"],
                     num_updates=a["updates"], max_new_tokens=a["max_new_tokens"], temperature=0.7,
                     learning_rate=3e-6, kl_coef=0.05, missing_eos_penalty=1.0, reward_norm=False,
                     sample_every=0, save_every=0)
    prompts = [{"prompt": p} for p in json.loads(Path(a["prompts"]).read_text())]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=a["mini"] // a["micro"])
    inputs = ppo.LoopInputs(tok, prompts, reward.rollout_reward(model, score_head, tok), seed=0)
    state = ppo.train(pv, inputs, pcfg, accelerator)
    return {"seconds": [h["seconds"] for h in state.history],
            "response_length": statistics.mean(h["response_length"] for h in state.history)}


def child_trl(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a["base"], padding_side="left")
    prompts = json.loads(Path(a["prompts"]).read_text())
    ids = [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for p in prompts]
    policy = AutoModelForCausalLM.from_pretrained(a["base"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(a["rm_merged"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(a["base"], num_labels=1)
    for m in (reward_model, value_model):
        m.config.pad_token_id = tok.pad_token_id

    stamps = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, report_to=[], seed=0, learning_rate=3e-6,
            per_device_train_batch_size=a["micro"], gradient_accumulation_steps=a["batch"] // a["micro"],
            num_mini_batches=a["batch"] // a["mini"], num_ppo_epochs=a["epochs"],
            total_episodes=a["batch"] * a["updates"], response_length=a["max_new_tokens"], stop_token="eos",
            temperature=0.7, kl_coef=0.05, missing_eos_penalty=1.0, local_rollout_forward_batch_size=a["batch"],
            num_sample_generations=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
            lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                             value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": ids}),
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[Timer()])
        start = time.perf_counter()
        trainer.train()
    marks = [start] + stamps
    lengths = [h.get("val/num_eos_tokens") for h in trainer.state.log_history]
    return {"seconds": [b - a_ for a_, b in zip(marks, marks[1:])], "eos_tokens": lengths}


# ----------------------------------------------------------------------------------------------
# the parent: environments, runs, table
# ----------------------------------------------------------------------------------------------


def trl_env(path: Path) -> Path:
    """A virtualenv with trl==1.12.0 and this environment's torch/transformers/peft/accelerate/datasets."""
    import importlib.metadata as md

    python = path / "bin" / "python"
    stamp = path / f".trl-{TRL_VERSION}"
    if stamp.exists():
        return python
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pins = [f"{p}=={md.version(p).split('+')[0]}" for p in ("transformers", "peft", "accelerate", "datasets")]
    torch_pin = f"torch=={md.version('torch').split('+')[0]}"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--retries", "2", "--timeout", "60"]
    cpu_index = [] if shutil.which("nvidia-smi") else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    print(f"installing trl=={TRL_VERSION} into {path} ({torch_pin}, {', '.join(pins)})", file=sys.stderr)
    subprocess.run([*pip, torch_pin, *cpu_index], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}", *pins], check=True)
    stamp.touch()
    return python


def run_child(python: str, which: str, args: dict, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [python, str(Path(__file__).resolve()), "--child", which, "--child-args", json.dumps(args),
           "--child-out", result_path]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{which} run failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    result["peak_rss_mb"] = usage.ru_maxrss * scale / 2**20
    result["wall_seconds"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--updates", type=int, default=6, help="PPO updates (the first one is excluded as warm-up)")
    ap.add_argument("--batch", type=int, default=8, help="rollout batch (prompts per update)")
    ap.add_argument("--mini", type=int, default=4, help="minibatch size")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size (gradient accumulation within a minibatch)")
    ap.add_argument("--epochs", type=int, default=2, help="PPO epochs per rollout batch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each child (1: stable on a shared 2-core machine; try 2 on an idle one)")
    ap.add_argument("--venv", default="/tmp/align-bench-trl112")
    ap.add_argument("--work", default=None, help="folder for the shared adapters and prompts")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out-json", type=Path, default=Path("docs/bench/ppo.json"))
    ap.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        import torch

        args = json.loads(a.child_args)
        torch.set_num_threads(args["threads"])
        result = (child_align if a.child == "align" else child_trl)(args)
        Path(a.child_out).write_text(json.dumps(result))
        return

    work = Path(a.work or f"/tmp/align-bench-ppo/{a.model}")
    shared = prepare(work, a.model, n_prompts=max(a.batch * a.updates, 8))
    args = {**shared, "batch": a.batch, "mini": a.mini, "micro": a.micro, "epochs": a.epochs,
            "updates": a.updates, "max_new_tokens": a.max_new_tokens, "threads": a.threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    results = {"align": run_child(sys.executable, "align", args, env)}
    if not a.skip_trl:
        python = trl_env(Path(a.venv))
        results["trl"] = run_child(str(python), "trl", args, env)

    def per_update(r):  # median of the updates after the first (warm-up)
        s = r["seconds"][1:] or r["seconds"]
        return statistics.median(s)

    names = {"align": "align (align/rl/ppo.py)", "trl": f"TRL {TRL_VERSION} (trl.experimental.ppo)"}
    rows = [f"model {a.model}, LoRA r={LORA['r']} all-linear, rollout batch {a.batch}, minibatch {a.mini}, "
            f"micro-batch {a.micro}, {a.epochs} PPO epochs, {a.max_new_tokens} new tokens, {a.updates} updates, "
            f"{a.threads} threads\n", "| implementation | s / update (median) | peak RSS (MB) | wall (s) |",
            "| --- | ---: | ---: | ---: |"]
    rows += [f"| {names[k]} | {per_update(r):.2f} | {r['peak_rss_mb']:.0f} | {r['wall_seconds']:.0f} |"
             for k, r in results.items()]
    if "trl" in results:
        t, o = results["trl"], results["align"]
        rows.append(f"| ratio TRL / align | {per_update(t) / per_update(o):.2f}x "
                    f"| {t['peak_rss_mb'] / o['peak_rss_mb']:.2f}x | {t['wall_seconds'] / o['wall_seconds']:.2f}x |")
    rows.append(f"\nalign mean response length: {results['align']['response_length']:.1f} tokens")
    print(bench_record.write(a.out_json, "bench_ppo.py", "\n".join(rows), results=results)["table_md"])

if __name__ == "__main__":
    main()
