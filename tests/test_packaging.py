"""A built wheel carries conf/ and data_recipes/, `python -m align` composes from it, and the README's "Your own
assistant" guide works as written: from a wheel in a fresh virtualenv, and from an editable clone."""

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


def guide_commands() -> list[str]:
    """The `python -m align` lines of the README guide, in order (between its guide:start and guide:end marks)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- guide:start -->\s*```bash\n(.*?)```\s*<!-- guide:end -->", text, re.S)
    assert block, "README.md lost its guide block"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    assert lines[1] == "mkdir cooking && cd cooking"
    return [line for line in lines if line.startswith("python -m align")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return next(out.glob("align-*.whl"))


def test_wheel_ships_configs_and_data_and_composes(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "align/conf/config.yaml" in names and "align/conf/stage/sft.yaml" in names
    assert "align/conf/stage/new.yaml" in names
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


def run_guide(python: Path, home: Path, extra_env: dict | None = None, commands: int | None = None) -> Path:
    """Run the guide's commands (the first `commands` of them, or all) from an empty folder with this `python` first
    on PATH; return the project folder."""
    project = home / "cooking"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    # PyRIT's public data from the test fixture, not PyPI (the wheel is fetched once on a user's machine)
    env.update({"PATH": f"{python.parent}{os.pathsep}{env['PATH']}", "WANDB_SILENT": "true",
                "ALIGN_PYRIT_WHEEL": str(ROOT / "tests/fixtures/public/pyrit"), **(extra_env or {})})
    for command in guide_commands()[:commands]:
        res = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
    return project


def check_project(project: Path, trained: bool = True) -> None:
    """The scaffold's files, and the cooking card (never the tax one) in every built (and evaluated) row."""
    for rel in ("conf/scope/cooking.yaml", "conf/data/cooking.yaml", "data/cooking/in_scope.jsonl",
                "data/cooking/dev.jsonl", "data/cooking/eval.jsonl",
                *(("outputs/try/sft/adapter/adapter_config.json", "outputs/try/safety_eval/metrics.json") if trained
                  else ())):
        assert (project / rel).exists(), rel
    sft = (project / "outputs/try/data/sft_train.jsonl").read_text()
    assert "You are a cooking assistant." in sft and "You are a tax assistant" not in sft
    assert "Sorry, I can only help with cooking questions, not " in sft  # the card's own refusals
    stats = (project / "outputs/try/data/stats.json").read_text()
    for source in ("off_scope_pool", "harm_pool", "attacks", "eval_attacks", "near_miss", "harmful"):
        assert f'"source": "{source}"' in stats, source
    if trained:
        assert '"finished_at"' in (project / "outputs/try/safety_eval/manifest.json").read_text()


def test_guide_from_a_wheel_in_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own (ensurepip costs seconds): this environment's pip installs into it (`pip --python`)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # the dependencies (torch, transformers, ...) come from this environment; align itself only from the wheel
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    where = subprocess.run([str(py), "-c", "import align; print(align.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), where
    check_project(run_guide(py, tmp_path))


def test_guide_from_an_editable_clone_with_no_hydra_flags(tmp_path):
    """The guide's scaffold and data build from this clone (the wheel test above runs its training and evaluation:
    the stages are the same code either way; what differs is where the configs and shipped data are found)."""
    project = run_guide(Path(sys.executable), tmp_path, commands=2)
    check_project(project, trained=False)
    # the unknown-option error names the user's folder and the package's
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    res = subprocess.run([sys.executable, "-m", "align", "stage=data", "data=cooking", "scope=cookng"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{project}/conf/scope" in res.stderr and "cooking" in res.stderr
