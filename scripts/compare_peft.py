"""Measured comparison of the PEFT methods: SFT with each peft= method on the same model, data, seed and steps.

Each method runs the sft stage in its own child process (so peak RSS doesn't mix) and the script writes a
markdown table, a PNG chart and the raw results (JSON) next to each other:

    python scripts/compare_peft.py                                  # SmolLM2-135M, all ten methods, 30 steps
    python scripts/compare_peft.py --methods lora,dora,ia3 --steps 10 --threads 2
    python scripts/compare_peft.py --lr lora=1e-3,ia3=1e-2          # change entries of the LR table
    python scripts/compare_peft.py trainer.learning_rate=3e-4       # one LR for every method (extra overrides)
    python scripts/compare_peft.py --model tiny --methods lora,full --steps 2 --out-md /tmp/cmp.md   # smoke run
    python scripts/compare_peft.py --methods full,full+galore_adamw,full+adalomo --out-md docs/full_optimizers.md

A method is a peft= option, optionally with `+<trainer.optim>`: full+galore_adamw is full fine-tuning with GaLore
(pip install galore-torch; its projection on the attention and MLP weights), full+lomo and full+adalomo with LOMO's
fused optimizers (pip install lomo-optim).

Extra overrides (trailing key=value) go to every child after the script's own, so they win.
A method that fails (e.g. bitfit on a model without biases) gets its one-line error in the table; the script
exits non-zero only when every method fails (and then writes nothing).
"""

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ALL_METHODS = "lora,qlora,dora,ia3,prefix,prompt,ptuning,bitfit,freeze,full"
# Starting learning rates per method, not tuned here (conf/peft/*.yaml sets none; the sft stage uses 3e-4 for
# all). Methods with few parameters need larger steps (prompt tuning papers go up to 0.3), while full and
# partial fine-tuning of every weight of a block need smaller ones.
LEARNING_RATES = {"lora": 3e-4, "qlora": 3e-4, "dora": 3e-4, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2,
                  "ptuning": 3e-3, "bitfit": 1e-3, "freeze": 5e-5, "full": 5e-5,
                  # full fine-tuning with a memory-saving optimizer: GaLore at AdamW's rate (it projects AdamW's
                  # update); LOMO is plain SGD fused into backward, AdaLomo adapts its step per weight
                  "full+galore_adamw": 5e-5, "full+lomo": 1e-2, "full+adalomo": 5e-4}
DEFAULT_LR = 3e-4  # for a method missing from the table
MB = 2**20
MARK = "compare_peft result: "  # the Trainer prints its own dict lines to stdout too


def split_method(method: str) -> tuple[str, str | None]:
    """'full+galore_adamw' -> ('full', 'galore_adamw'); 'lora' -> ('lora', None)."""
    peft, _, optim = method.partition("+")
    return peft, optim or None


def optimizer_overrides(optim: str | None) -> list[str]:
    if optim is None:
        return []
    # GaLore projects the gradients of the weights it is told about (module-name patterns); here every linear
    # layer of attention and MLP blocks, as in the GaLore paper
    galore = ["+trainer.extra.optim_target_modules=[attn,mlp]"] if optim.startswith("galore") else []
    return [f"trainer.optim={optim}", *galore]


def overrides(args, method: str, out: str, lr) -> list[str]:
    """The child's Hydra overrides: identical for every method except peft= (and trainer.optim=), run.name= and
    the LR."""
    peft, optim = split_method(method)
    return [f"model={args.model}", f"peft={peft}", "data=tax_assistant", "tracking=none",
            f"run.output_dir={out}", f"run.name={method.replace('+', '-')}", f"data.max_rows={args.rows}",
            f"trainer.max_steps={args.steps}", f"trainer.per_device_train_batch_size={args.batch}",
            f"trainer.max_length={args.max_length}", f"trainer.learning_rate={lr}",
            # the Trainer saves a checkpoint (with optimizer state) at the last step whatever save_steps says,
            # inside train_runtime: turn checkpoints off so s/step is training alone
            "trainer.save_steps=100000", "+trainer.extra.save_strategy=no", *optimizer_overrides(optim), *args.extra]


def child(method: str, threads: int | None, cfg_overrides: list[str]) -> None:
    """One sft run in this process; prints its result as one JSON line after MARK."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    from align import adapters
    from align.__main__ import _one_line, quiet_libraries, run_stage
    from align.config import compose

    quiet_libraries()
    res = {"method": method, "ok": False, "torch_threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        cfg = compose("stage=sft", *cfg_overrides)
        res.update(lr=cfg.trainer.learning_rate, seed=cfg.seed, logging_steps=cfg.trainer.logging_steps,
                   peft=OmegaConf.to_container(cfg.peft, resolve=True))
        m = run_stage(cfg)
        saved = Path(cfg.run.output_dir) / cfg.run.name / "sft" / (
            "model" if adapters.saves_full_model(cfg.peft) else "adapter")
        res.update(ok=True, saved=saved.name,
                   size_mb=sum(f.stat().st_size for f in saved.glob("*.safetensors")) / MB,
                   s_per_step=m["train/train_runtime"] / max(m["train/global_step"], 1),
                   **{k: m.get(k) for k in ("trainable_params", "total_params", "trainable_share",
                                            "train/first_loss", "train/last_loss", "train/train_loss",
                                            "eval_loss", "train/train_runtime", "train/global_step")})
    except Exception as exc:  # one row of the table, not the end of the comparison
        res["error"] = _one_line(exc)
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(MARK + json.dumps(res), flush=True)


def run_method(method: str, args, out: str) -> dict:
    """Run one method in a child process; a crash becomes an error row too."""
    cmd = [sys.executable, __file__, "--child", method]
    env = dict(os.environ)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd += ["--", *overrides(args, method, out, args.lrs.get(method, DEFAULT_LR))]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    try:
        res = json.loads(lines[-1][len(MARK):])
    except (IndexError, json.JSONDecodeError):  # killed (OOM, signal) or crashed before printing
        tail = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        res = {"method": method, "ok": False,
               "error": f"exit code {proc.returncode}" + (f": {tail[-1]}" if tail else "")}
    res["wall_s"] = wall
    if not res["ok"]:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def versions() -> dict:
    def get(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {pkg: get(pkg) for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes")}


def fmt(x, kind: str = "num") -> str:
    """Table cell: thousands separators for counts, 3 significant digits for small values."""
    if x is None or x != x:  # None or NaN
        return "-"
    if kind == "int":
        return f"{int(x):,}"
    if kind == "loss":
        return f"{x:.4f}"
    if kind == "lr":
        return f"{x:g}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def setting(r: dict) -> str:
    """What the method trains, from the child's composed peft config."""
    p, (m, optim) = r.get("peft") or {}, split_method(r["method"])
    if optim:
        return f"{setting({**r, 'method': m})}, optimizer {optim}"
    if m in ("lora", "qlora", "dora"):
        quant = f", base in 4-bit {p['bnb_4bit_quant_type']}" if p.get("load_in_4bit") else ""
        layers = f", last {p['last_n_layers']} blocks" if p.get("last_n_layers") else ""
        return f"r={p['r']}, alpha={p['lora_alpha']}, dropout={p['lora_dropout']}, " \
               f"targets={p['target_modules']}{layers}{quant}"
    if m == "ia3":
        return f"targets={p['target_modules'] or 'peft default for the architecture'}"
    if m in ("prefix", "prompt", "ptuning"):
        return f"{p['num_virtual_tokens']} virtual tokens"
    if m == "freeze":
        return f"last {p['freeze_last_n']} blocks + final norm + (untied) lm_head"
    return {"bitfit": "bias terms only", "full": "every weight"}.get(m, "")


COLUMNS = ["method", "trainable params", "share of total (%)", "adapter/model size on disk (MB)", "peak RSS (MB)",
           "s/step", "wall (s)", "first train loss", "final train loss", "eval loss", "LR"]


def row(r: dict) -> list[str]:
    if not r["ok"]:
        error = r["error"].replace("|", "\\|")
        error = error if len(error) <= 200 else error[:197] + "..."
        return [r["method"], f"failed: {error}"] + ["-"] * (len(COLUMNS) - 3) + [fmt(r.get("lr"), "lr")]
    return [r["method"], fmt(r["trainable_params"], "int"), fmt(100 * r["trainable_share"]),
            f"{fmt(r['size_mb'])} ({r['saved']}/)", fmt(r["max_rss_mb"]), fmt(r["s_per_step"]), fmt(r["wall_s"]),
            fmt(r["train/first_loss"], "loss"), fmt(r["train/last_loss"], "loss"), fmt(r["eval_loss"], "loss"),
            fmt(r["lr"], "lr")]


def loss_window(steps: int, every: int | None) -> str:
    """The steps the final train loss averages: the Trainer logs step 1, then the mean since the last log
    every `every` steps; steps after the last multiple of `every` are never logged."""
    if not every:
        return "?"
    last = steps // every * every
    if last <= 1:
        return "step 1"
    first = max(last - every + 1, 2)
    return f"step {last}" if first == last else f"steps {first}-{last}"


def markdown(report: dict, png: Path, md: Path) -> str:
    s, mach, results = report["settings"], report["machine"], report["results"]
    ok = [r for r in results if r["ok"]]
    first = ok[0] if ok else {}
    vers = ", ".join(f"{k} {v}" for k, v in mach["versions"].items() if v)
    extra = " ".join(s["extra"]) or "none"
    lines = [
        f"# PEFT methods compared: SFT on model={s['model']}", "",
        "Produced by `scripts/compare_peft.py` with:", "", "```", report["command"], "```", "",
        f"- Date: {report['date']}",
        f"- Machine: {mach['cpu_count']} CPUs (`os.cpu_count()`), {mach['platform']}, "
        f"device {first.get('device', '?')}, {first.get('torch_threads', '?')} torch thread(s) per child, "
        f"Python {mach['python']}",
        f"- Versions: {vers}",
        f"- Settings (the same for every method): data=tax_assistant, data.max_rows={s['rows']} (per split), "
        f"seed {first.get('seed', '?')}, {s['steps']} steps, batch {s['batch']}, max_length {s['max_length']}, "
        f"final train loss = mean over {loss_window(s['steps'], first.get('logging_steps'))}, no checkpoints, "
        f"extra overrides: {extra}",
        "", "## Results", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row(r)) + " |" for r in results),
        "", "What each method trains (from the composed `conf/peft/<method>.yaml`):", "",
        *(f"- {r['method']}: {setting(r)}" for r in ok),
        "", f"![PEFT comparison chart]({os.path.relpath(png, md.parent)})", "",
        "## How to read this", "",
        "- **trainable params / share of total**: parameters with `requires_grad` after the method is attached, "
        "over all parameters of the model as trained (the prompt-learning methods add their own parameters to the "
        "total; QLoRA's 4-bit weights count as the parameters they stand for; freeze unties lm_head from the input "
        "embeddings, so its total holds both copies).",
        "- **size on disk**: the `*.safetensors` weight files only (tokenizer and config files left out) of "
        "`sft/adapter/` for adapter methods, or of `sft/model/` for full, bitfit and freeze, which save the whole "
        "model even when they change a few weights. P-tuning trains a prompt encoder, but peft saves only the "
        "virtual-token embeddings it produces. 1 MB = 2^20 bytes.",
        "- **peak RSS**: the child process's maximum resident set size (`ru_maxrss`) over its whole life: imports, "
        "data build, model load, training, evaluation and saving. It is CPU memory; on a GPU it does not measure "
        "GPU memory.",
        "- **s/step**: the trainer's own `train_runtime / global_step` (model loading, data building, evaluation "
        "and saving left out; every step counted, the first one included). **wall (s)** is the whole child process, "
        "imports included. Timings depend on what else the machine runs at the same time.",
        "- **first train loss**: the loss of step 1; **final train loss**: the mean loss over the last logging "
        "window (the steps named under Settings); **eval loss**: on the held-out eval split after the last step. "
        "Every method computes the loss on the same assistant tokens (peft leaves the virtual tokens out of the "
        "labels).",
        "- **LR**: each method runs with its own learning rate from the script's `LEARNING_RATES` table (a "
        "starting point per method, not tuned on this data) unless the command overrides it, so the losses compare "
        "the methods at these learning rates, not at their best ones. One short run with one seed: small "
        "differences between losses may be noise. Pass `trainer.learning_rate=...` to run every method at one "
        "learning rate, or `--lr method=value,...` to change entries.",
        "- A **failed** row carries the method's one-line error; its other cells are empty.",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    # eval losses sit close together far from zero: dots on a zoomed axis, where bars would mislead
    panels = [("trainable share of total (%, log scale)", lambda r: 100 * r["trainable_share"], "log"),
              ("peak RSS (MB)", lambda r: r["max_rss_mb"], "bar"),
              ("seconds per training step", lambda r: r["s_per_step"], "bar"),
              ("eval loss after training (zoomed axis)", lambda r: r["eval_loss"], "dot")]
    names = [r["method"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(12, 2 * (0.9 + 0.32 * len(results))), sharey=True)
    for ax, (label, get, kind) in zip(axes.flat, panels):
        values = [get(r) if r["ok"] and get(r) is not None else None for r in results]
        ys = [i for i, v in enumerate(values) if v is not None]
        xs = [values[i] for i in ys]
        if kind == "dot":
            ax.plot(xs, ys, "o", color="tab:blue")
            for x, y in zip(xs, ys):
                ax.annotate(fmt(x, "loss"), (x, y), xytext=(6, 0), textcoords="offset points", va="center",
                            fontsize=8)
        else:
            bars = ax.barh(ys, xs, color="tab:blue")
            ax.bar_label(bars, labels=[fmt(x) for x in xs], padding=3, fontsize=8)
            ax.set_xscale("log" if kind == "log" else "linear")
        at = blended_transform_factory(ax.transAxes, ax.transData)
        for i, v in enumerate(values):
            if v is None:
                ax.text(0.01, i, "failed" if not results[i]["ok"] else "n/a", transform=at, va="center",
                        color="tab:red", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.margins(x=0.18)  # room for the value labels
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(range(len(names)), names)
    axes[0, 0].set_ylim(len(names) - 0.5, -0.5)  # first method on top, as in the table
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_lrs(text: str | None) -> dict:
    lrs = dict(LEARNING_RATES)
    for item in filter(None, (text or "").split(",")):
        method, _, value = item.partition("=")
        lrs[method.strip()] = float(value)
    return lrs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="conf/model name (tiny for smoke runs)")
    p.add_argument("--methods", default=ALL_METHODS, help="comma list of peft= methods")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=256, help="rows per split (data.max_rows)")
    p.add_argument("--lr", help="change entries of the per-method LR table, e.g. lora=1e-3,ia3=1e-2")
    p.add_argument("--out-md", type=Path, default=Path("docs/peft_comparison.md"))
    p.add_argument("--out-png", type=Path, help="chart (default: next to --out-md, same stem, .png)")
    p.add_argument("--threads", type=int, help="torch/OMP threads in each child (default: inherit)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra overrides for every method, e.g. trainer.learning_rate=1e-4")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.threads, args.extra)

    args.lrs = parse_lrs(args.lr)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    png = args.out_png or args.out_md.with_suffix(".png")
    out = tempfile.mkdtemp(prefix="align-compare-peft-")
    results = []
    try:
        for i, method in enumerate(methods, 1):
            print(f"[{i}/{len(methods)}] peft={method} ...", file=sys.stderr, flush=True)
            r = run_method(method, args, out)
            status = f"{r['s_per_step']:.2f} s/step" if r["ok"] else f"failed: {r['error']}"
            print(f"[{i}/{len(methods)}] peft={method}: {status} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append(r)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    report = {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "versions": versions()},
        "settings": {"model": args.model, "methods": methods, "steps": args.steps, "batch": args.batch,
                     "max_length": args.max_length, "rows": args.rows, "threads": args.threads, "extra": args.extra,
                     "learning_rates": args.lrs,
                     "overrides": overrides(args, "<method>", "<tmp>", "<per-method LR>")},
        "results": results,
    }
    if not any(r["ok"] for r in results):
        for r in results:
            print(f"peft={r['method']} failed: {r['error']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
        sys.exit("every method failed; nothing written")
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png, f"SFT with each PEFT method: model={args.model}, {args.steps} steps, batch {args.batch}, "
                       f"max_length {args.max_length}")
    text = markdown(report, png, args.out_md)
    args.out_md.write_text(text)
    args.out_md.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"wrote {args.out_md}, {png} and {args.out_md.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
