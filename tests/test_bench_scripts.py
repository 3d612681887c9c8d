"""Smoke runs of the benchmark scripts on the tiny model: they run, write their raw JSON and print their table.

A script whose output is all that is checked runs its main() in the test's process (as test_ppo runs check_critic
and check_reward), where torch and align are already imported; bench_stage_memory.py still starts one child per
stage, which is what it measures."""

import importlib
import json
import os
import subprocess
import sys

from conftest import ROOT


def run_script(monkeypatch, capsys, name: str, *args: str) -> str:
    """`python scripts/<name>.py <args>` from the repository root, as main() in this process; what it printed."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setattr(sys, "argv", [f"scripts/{name}.py", *args])
    monkeypatch.chdir(ROOT)
    importlib.import_module(name).main()
    return capsys.readouterr().out


def test_stage_memory_benchmark_writes_json_and_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "stage_memory.json"
    stdout = run_script(monkeypatch, capsys, "bench_stage_memory", "--model", "tiny", "--steps", "1", "--rows", "4",
                        "--batch", "2", "--max-length", "64", "--stages", "sft", "--out-json", str(out),
                        "--extra", "data=instructions", "scope=none")
    record = json.loads(out.read_text())
    assert record["command"].startswith("python scripts/bench_stage_memory.py --model tiny")
    assert record["cpu"] and record["date"]
    lora, full = record["results"]["lora"]["sft"], record["results"]["full"]["sft"]
    assert lora["ok"] and full["ok"], (lora, full)
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["max_rss_mb"] > 100 and full["max_rss_mb"] > 100
    row = [line for line in stdout.splitlines() if line.startswith("| sft |")]
    assert row and len(row[0].split("|")) == 8


def test_gpu_check_dry_run_prints_the_pipeline_ddp_and_report_commands():
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "RUN_NAME": "chk", "GPUS": "4"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("-m align run.name=chk tracking=none model.dtype=bfloat16")
    assert "--config_file conf/accelerate/ddp.yaml --num_processes 4" in lines[1] and "stage=sft" in lines[1]
    assert lines[2].endswith("scripts/gpu_report.py outputs/chk outputs/chk-ddp") and len(lines) == 3


def test_gpu_report_reads_a_finished_run(finished_sft):
    res = subprocess.run([sys.executable, "scripts/gpu_report.py", str(finished_sft / "base")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("| base | sft |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1" and float(cells[3]) > 0 and cells[4] != "-" and cells[6] == "cpu"  # tokens/s counted
    bad = subprocess.run([sys.executable, "scripts/gpu_report.py", str(finished_sft / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "holds no finished stage" in bad.stderr


def test_throughput_benchmark_measures_the_peak_and_sfts_share(tmp_path, monkeypatch, capsys):
    out = tmp_path / "throughput.json"
    stdout = run_script(monkeypatch, capsys, "bench_throughput", "--model", "tiny", "--steps", "2", "--out-json",
                        str(out), "data=instructions", "scope=none", "trainer.max_length=64")
    record = json.loads(out.read_text())
    peaks, sft = record["matmul_peak_gflops"], record["sft"]
    assert peaks["float32"] > 0 and peaks["bfloat16"] > 0 and sft["tokens_per_second"] > 0
    assert sft["flops_per_token"] == 4 * sft["total_params"]  # LoRA: forward and input-gradient passes
    assert record["share_of_peak"]["float32"] == sft["gflops"] / peaks["float32"]
    assert "| matmul peak, float32 |" in stdout
