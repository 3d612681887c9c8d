"""scripts/compare_peft.py on the tiny model: one child per method, a table row each (a failure is a row too),
a PNG chart and the raw JSON; non-zero exit only when every method fails."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "compare_peft.py"
FAST = ["--model", "tiny", "--steps", "2", "--rows", "16", "--batch", "2", "--max-length", "64", "--threads", "1"]
# extra overrides reach every child after the script's own: the small instructions recipe, not the script's
# tax_assistant (whose build each child would pay for; what is compared is the same either way)
SMALL_DATA = ["data=instructions", "scope=none"]


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *FAST, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def table_rows(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0]: the header


def test_compare_writes_table_chart_and_json_and_keeps_going_past_failures(tmp_path):
    md = tmp_path / "cmp.md"
    # a method that is no peft= option fails in its child process, and the table goes on (a method failing inside
    # training, bitfit on the bias-free tiny Llama, is test_peft_methods' case)
    res = compare("--methods", "lora,nonexistent,full", "--lr", "full=1e-4", "--out-md", str(md),
                  "trainer.logging_steps=1", *SMALL_DATA)
    assert res.returncode == 0, res.stderr[-3000:]
    text = md.read_text()
    assert "--methods lora,nonexistent,full" in text  # the command that produced it
    rows = table_rows(text)
    assert list(rows) == ["lora", "nonexistent", "full"]
    for method in ("lora", "full"):
        cells = rows[method]
        assert len(cells) == 10, cells
        for cell in cells:  # every cell a number (the size cell names the folder it measured)
            assert math.isfinite(float(cell.split(" (")[0].replace(",", ""))), (method, cell)
    assert rows["nonexistent"][0].startswith("failed: unknown option 'nonexistent' for peft=")
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](cmp.png)" in text

    results = {r["method"]: r for r in json.loads((tmp_path / "cmp.json").read_text())["results"]}
    lora, full = results["lora"], results["full"]
    assert lora["ok"] and full["ok"] and not results["nonexistent"]["ok"]
    assert 0 < lora["trainable_params"] < lora["total_params"]
    assert full["trainable_params"] == full["total_params"] > 0 and full["trainable_share"] == 1.0
    assert rows["full"][1] == "100"
    # both train the same base: LoRA's total is the base plus its adapter, which is all it trains
    assert lora["total_params"] - lora["trainable_params"] == full["total_params"]
    assert (lora["saved"], full["saved"]) == ("adapter", "model") and 0 < lora["size_mb"] < full["size_mb"]
    assert (lora["lr"], full["lr"]) == (3e-4, 1e-4)  # the LR table, with --lr changing one entry
    assert lora["logging_steps"] == full["logging_steps"] == 1  # extra overrides reach every child
    assert lora["train/global_step"] == full["train/global_step"] == 2
    assert all(r["s_per_step"] > 0 and r["max_rss_mb"] > 0 and math.isfinite(r["eval_loss"]) for r in (lora, full))


def test_compare_fails_when_every_method_fails(tmp_path):
    md = tmp_path / "cmp.md"
    res = compare("--methods", "nonexistent", "--out-md", str(md))
    assert res.returncode != 0
    assert "unknown option 'nonexistent'" in res.stderr and "every method failed" in res.stderr
    assert not md.exists()


def test_a_method_may_name_a_full_parameter_optimizer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_peft", ROOT / "scripts" / "compare_peft.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    assert cmp.split_method("full+galore_adamw") == ("full", "galore_adamw")
    assert cmp.split_method("lora") == ("lora", None)
    args = SimpleNamespace(model="tiny", rows=4, steps=2, batch=2, max_length=64, extra=["trainer.logging_steps=1"])
    ov = cmp.overrides(args, "full+galore_adamw", "/tmp/x", 5e-5)
    assert "peft=full" in ov and "run.name=full-galore_adamw" in ov and "trainer.optim=galore_adamw" in ov
    assert "+trainer.extra.optim_target_modules=[attn,mlp]" in ov and ov[-1] == "trainer.logging_steps=1"
