"""Smoke runs of the benchmark scripts on the tiny model: they run, write their raw JSON and print their table."""

import json
import subprocess
import sys

from conftest import ROOT


def test_stage_memory_benchmark_writes_json_and_table(tmp_path):
    out = tmp_path / "stage_memory.json"
    res = subprocess.run([sys.executable, "scripts/bench_stage_memory.py", "--model", "tiny", "--steps", "1",
                          "--rows", "8", "--stages", "sft", "--out-json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("python scripts/bench_stage_memory.py --model tiny")
    assert record["cpu"] and record["date"]
    lora, full = record["results"]["lora"]["sft"], record["results"]["full"]["sft"]
    assert lora["ok"] and full["ok"], (lora, full)
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["max_rss_mb"] > 100 and full["max_rss_mb"] > 100
    row = [line for line in res.stdout.splitlines() if line.startswith("| sft |")]
    assert row and len(row[0].split("|")) == 8
