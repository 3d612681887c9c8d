import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite stays offline: the default recipe (tax_scoped) reads public harm prompts and jailbreak templates from
# the PyRIT wheel, which tests read from its cut in tests/fixtures/public/pyrit instead of downloading it
os.environ.setdefault("ALIGN_PYRIT_WHEEL", str(Path(__file__).resolve().parent / "fixtures" / "public" / "pyrit"))

# fast settings for the tiny model: every stage runs in seconds
TINY = ["model=tiny", "tracking=none", "trainer.logging_steps=1", "trainer.save_steps=1000"]
SFT_ARGS = ["stage=sft", *TINY, "data=instructions", "scope=none"]


def compose(tmp_path: Path, *overrides: str):
    """The config `python -m align <overrides>` would run, with outputs under tmp_path."""
    from align.config import compose as align_compose

    return align_compose(f"run.output_dir={tmp_path}", *overrides)


def run_stage(tmp_path: Path, *overrides: str) -> dict:
    from align.__main__ import run_stage as _run

    return _run(compose(tmp_path, *overrides))


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None, module=("-m", "align")) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"WANDB_SILENT": "true", **(env or {})})
    return subprocess.run([sys.executable, *module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture
def tiny_sft(tmp_path):
    """A finished SFT stage on the tiny model (run.name=t)."""
    run_stage(tmp_path, "stage=sft", *TINY, "run.name=t", "data=instructions", "scope=none",
              "trainer.max_steps=4", "trainer.learning_rate=1e-3")
    return tmp_path
