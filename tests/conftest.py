import os
import re
import shutil
import subprocess
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N worker processes share the cores, so each (and the `python -m align` children it starts)
    # runs torch on one thread; set before anything imports torch
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite stays offline: the default recipe (tax_scoped) reads public harm prompts and jailbreak templates from
# the PyRIT wheel, which tests read from its cut in tests/fixtures/public/pyrit instead of downloading it
os.environ.setdefault("ALIGN_PYRIT_WHEEL", str(Path(__file__).resolve().parent / "fixtures" / "public" / "pyrit"))

# fast settings for the tiny model: every stage runs in seconds
TINY = ["model=tiny", "tracking=none", "trainer.logging_steps=1", "trainer.save_steps=1000"]
SFT_ARGS = ["stage=sft", *TINY, "data=instructions", "scope=none"]

# the finished SFT run that many tests read or start from (the `finished_sft` fixture): run.name=base, seed 42, two
# steps of batch 2 with a checkpoint after each, trained with a token in trainer.extra that must reach no file
SECRET = "hf_reliabilitySECRET123"
FINISHED_SFT = [*SFT_ARGS, "trainer.max_steps=2", "trainer.save_steps=1", "trainer.learning_rate=1e-3",
                "trainer.per_device_train_batch_size=2"]

# a tax_assistant SFT run (the `tax_sft` fixture) for the stages that train from it: rm, dpo, kto
PREF = [*TINY, "data=tax_assistant", "scope=tax_assistant", "trainer.max_length=128", "data.max_rows=8",
        "trainer.per_device_train_batch_size=2", "trainer.per_device_eval_batch_size=16"]
# the dpo and kto runs that start from it may cut their rows at 80 tokens (the dpo stage's own default): none of
# PREF's pairs is dropped there, and the vocabulary-wide log-prob work shrinks with the rows (the rm stage's reward
# rows would lose one eval pair at 80, so rm keeps PREF's 128)
PAIR_LENGTH = "trainer.max_length=80"


def compose(tmp_path: Path, *overrides: str):
    """The config `python -m align <overrides>` would run, with outputs under tmp_path."""
    from align.config import compose as align_compose

    return align_compose(f"run.output_dir={tmp_path}", *overrides)


def run_stage(tmp_path: Path, *overrides: str) -> dict:
    from align.launch import run_stage as _run

    return _run(compose(tmp_path, *overrides))


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m align <args>`, run to its end in a child of the worker's forkserver (tests/forked.py)."""
    return start_cli(*args, cwd=cwd, env=env).result(timeout=900)


def start_cli(*args: str, cwd: Path = ROOT, env: dict | None = None):
    """`python -m align <args>` started in a child of the worker's forkserver: pid, poll(), kill(), wait(), result()."""
    import forked

    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"WANDB_SILENT": "true", **(env or {})})
    return forked.Align(list(args), cwd, full_env)


# ------------------------------------------------------------------------------------ runs trained once per session


def shared(tmp_path_factory, name: str, build) -> Path:
    """An output folder that `build(folder)` fills once per test session, read-only for the tests (copy_run it to
    change anything). Under pytest-xdist the workers share it: the first to ask builds it under a file lock while
    the others wait, and a failed build is retried by the next worker that asks."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above every worker's own
    folder = base / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder.parent / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder.parent / f"{name}.built").touch()
    return folder


def copy_run(src: Path, dst: Path) -> Path:
    """Copy the runs under output folder `src` into `dst` as if they had been run there: the absolute paths that
    the stages record (config.yaml's run.output_dir, the manifests' outputs and parents, the reports) name `dst`,
    so the pipeline's staleness checks and the parents' hashes read the copy, never the original."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    old = re.compile(re.escape(str(src)) + r"(?=[/\"'\s,\]}]|$)", re.M)
    for f in dst.rglob("*"):
        if f.suffix in (".json", ".yaml", ".md") and f.is_file():
            text = f.read_text()
            if str(src) in text:
                f.write_text(old.sub(str(dst), text))
    return dst


@pytest.fixture(scope="session")
def finished_sft(tmp_path_factory) -> Path:
    """The output folder of a finished FINISHED_SFT run (run.name=base); read it, or copy_run it to write."""
    return shared(tmp_path_factory, "finished_sft",
                  lambda root: run_stage(root, *FINISHED_SFT, "run.name=base", f"+trainer.extra.hub_token={SECRET}"))


@pytest.fixture
def tiny_sft(finished_sft, tmp_path) -> Path:
    """tmp_path holding a copy of the finished SFT stage (run.name=base), the test's own to change."""
    return copy_run(finished_sft, tmp_path)


def _tax_sft(root: Path) -> None:
    run_stage(root, "stage=data", *PREF, "run.name=p")
    run_stage(root, "stage=sft", *PREF, "run.name=p", "trainer.max_steps=3")


@pytest.fixture(scope="session")
def tax_sft(tmp_path_factory) -> Path:
    """The output folder of a finished tax_assistant data build and 3-step SFT stage (run.name=p, the PREF settings):
    the stages run on its copies read the data build instead of building the recipe again."""
    return shared(tmp_path_factory, "tax_sft", _tax_sft)
