"""A built wheel carries conf/ and data_recipes/, and `python -m align` composes from it."""

import os
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_configs_and_data_and_composes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("align-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "align/conf/config.yaml" in names and "align/conf/stage/sft.yaml" in names
    assert "align/data_recipes/tax_assistant/in_scope_a.jsonl" in names
    assert "align/data_recipes/judge/gold.jsonl" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("from align.data.sources import resolve, shipped; from align.evaluation.judges import JUDGE_DATA; "
            "import align; print(align.__file__); print(resolve('shipped:tax_assistant/off_scope.jsonl')); "
            "print(JUDGE_DATA)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines
    job = subprocess.run([sys.executable, "-m", "align", "stage=dpo", "--cfg", "job"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert job.returncode == 0 and "name: dpo" in job.stdout, job.stderr[-2000:]
