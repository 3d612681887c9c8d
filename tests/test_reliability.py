"""Issue #26: nothing lost (overwrite is a swap, locks), nothing stale (complete checkpoints, seeds), one clear line
(range checks, run.name), no secrets shipped. One finished SFT run is shared by the tests that read it."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (FINISHED_SFT as SFT, PAIR_LENGTH, PREF, ROOT, SECRET, TINY, cli, compose, copy_run, run_stage,
                      start_cli)

from align import AlignError, checks, locks, runs


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter_bytes(root: Path, name: str) -> bytes:
    return (root / name / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def finished(finished_sft, tmp_path_factory):
    """A copy of the session's finished 2-step SFT run (run.name=base, seed 42, a checkpoint per step), trained with
    a token in trainer.extra that must not reach any file; the tests below only read it (or fail to change it)."""
    return copy_run(finished_sft, tmp_path_factory.mktemp("reliability"))


# ---------------------------------------------------------------------------------------------- range checks

BAD_VALUES = [
    ("trainer.max_steps=0", "trainer.max_steps=0", "-1 or >= 1"),
    ("trainer.learning_rate=0", "trainer.learning_rate=0", "> 0"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size=0", ">= 1"),
    ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps=0", ">= 1"),
    ("dpo.beta=0", "dpo.beta=0", "> 0"),
    ("kto.beta=-0.1", "kto.beta=-0.1", "> 0"),
    ("eval.batch_size=0", "eval.batch_size=0", ">= 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0", ">= 1"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5", "in [0, 1)"),
    ("peft.lora_dropout=1.0", "peft.lora_dropout=1", "in [0, 1)"),
    ("eval.min_os=2", "eval.min_os=2", "in [0, 1]"),
    ("peft.r=0", "peft.r=0", ">= 1"),
    ("peft.lora_alpha=0", "peft.lora_alpha=0", "> 0"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps=-1", ">= 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1", ">= 0"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm=-1", ">= 0"),
    ("trainer.max_length=0", "trainer.max_length=0", ">= 1"),
    ("trainer.save_steps=0", "trainer.save_steps=0", ">= 1"),
    ("trainer.per_device_eval_batch_size=0", "trainer.per_device_eval_batch_size=0", ">= 1"),
    ("trainer.num_train_epochs=0", "trainer.num_train_epochs=0", "> 0"),
    ("data.max_rows=0", "data.max_rows=0", ">= 1"),
    ("rm.tie_epsilon=-1", "rm.tie_epsilon=-1", ">= 0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5", "in [0, 0.5)"),
    ("kto.desirable_weight=0", "kto.desirable_weight=0", "> 0"),
    ("ppo.temperature=0", "ppo.temperature=0", "> 0"),
    ("ppo.top_p=0", "ppo.top_p=0", "in (0, 1]"),
    ("ppo.gamma=1.5", "ppo.gamma=1.5", "in [0, 1]"),
    ("ppo.lam=-0.1", "ppo.lam=-0.1", "in [0, 1]"),
    ("ppo.cliprange=0", "ppo.cliprange=0", "> 0"),
    ("ppo.num_updates=0", "ppo.num_updates=0", ">= 1"),
    ("ppo.kl_coef=-1", "ppo.kl_coef=-1", ">= 0"),
    ("grpo.num_generations=1", "grpo.num_generations=1", ">= 2"),
    ("eval.max_prompts=0", "eval.max_prompts=0", ">= 1"),
    ("eval.min_ar_in=-0.5", "eval.min_ar_in=-0.5", "in [0, 1]"),
    ("generate.max_new_tokens=0", "generate.max_new_tokens=0", ">= 1"),
    ("seed=-1", "seed=-1", "in [0, 4294967295]"),
    ("trainer.learning_rate=nan", "trainer.learning_rate=nan", "> 0"),
]


@pytest.mark.parametrize("override,shown,expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_line_exit_2_and_keeps_finished_outputs(finished, override, shown, expected):
    """Each range check's error, raised before the finished run is touched: one line, which the CLI prints as
    `error: <line>` with exit 2 (test_hydra_logs_are_scrubbed runs one bad value through the CLI)."""
    before = snapshot(finished / "base" / "sft")
    with pytest.raises(AlignError) as err:
        run_stage(finished, *SFT, "run.name=base", "run.overwrite=true", override)
    line = str(err.value)
    assert "\n" not in line and shown in line and f"expected {expected}" in line, line
    assert snapshot(finished / "base" / "sft") == before
    assert not (finished / "base" / "sft.new").exists()


def test_every_shipped_config_passes_the_checks():
    from align.config import STAGES

    for stage in STAGES:
        checks.check(compose(Path("outputs"), f"stage={stage}"))
    checks.check(compose(Path("outputs"), "stage=pipeline", "pipeline.policy=ppo"))


def test_ranges_describe_themselves():
    assert checks.describe(checks.RANGES["trainer.max_steps"]) == "-1 or >= 1"
    assert checks.describe(checks.RANGES["dpo.label_smoothing"]) == "in [0, 0.5)"
    assert checks.describe(checks.RANGES["ppo.top_p"]) == "in (0, 1]"
    assert all(r.why for r in checks.RANGES.values())
    cfg = compose(Path("outputs"), "stage=sft", "data.sources=[{name: a, path: b.jsonl, weight: -1}]")
    with pytest.raises(AlignError, match=r"data.sources\[0\].weight=-1: expected >= 0"):
        checks.check(cfg)
    with pytest.raises(AlignError, match="trainer.learning_rate=nan"):
        checks.check(compose(Path("outputs"), "stage=sft", "trainer.learning_rate=nan"))


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path):
    with pytest.raises(AlignError, match=r"pipeline stage dpo: dpo.beta=0: expected > 0"):
        run_stage(tmp_path, "stage=pipeline", *TINY, "data=instructions", "scope=none", "run.name=p",
                  'pipeline.overrides.dpo=["dpo.beta=0"]')
    assert not (tmp_path / "p" / "data").exists()


@pytest.mark.parametrize("name", ["../x", "", "/abs", ".."])
def test_run_name_outside_output_dir_is_refused(tmp_path, name):
    out = tmp_path / "out"
    res = cli(*SFT, f"run.name={name}", f"run.output_dir={out}")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.name" in lines[0], res.stderr
    assert not list(tmp_path.rglob("sft")) and not list(tmp_path.rglob("manifest.json"))
    assert not list(tmp_path.rglob("logs"))  # checked before Hydra makes <output_dir>/<name>/logs


# ---------------------------------------------------------------------------------------------- overwrite swap


def test_failing_overwrite_keeps_the_old_run(tiny_sft):
    before = snapshot(tiny_sft / "base" / "sft")
    with pytest.raises(AlignError, match="nope.jsonl"):
        run_stage(tiny_sft, *SFT, "run.name=base", "run.overwrite=true", "data.train_files=[nope.jsonl]")
    assert snapshot(tiny_sft / "base" / "sft") == before
    assert not runs.is_finished(tiny_sft / "base" / "sft.new")
    assert not locks.lock_path(compose(tiny_sft, "run.name=base").run, "sft").exists()  # released on failure


def test_killed_overwrite_keeps_the_old_run_and_resumes_into_a_swap(finished, tmp_path, caplog):
    root = tmp_path
    shutil.copytree(finished / "base", root / "kill")
    old = snapshot(root / "kill" / "sft")
    new = root / "kill" / "sft.new"
    proc = start_cli(*SFT, "run.name=kill", f"run.output_dir={root}", "run.overwrite=true", "trainer.max_steps=500",
                     "seed=7", env={"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while runs.last_checkpoint(new) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        proc.kill()  # SIGKILL
        proc.result()
    assert runs.last_checkpoint(new), "the overwrite wrote no checkpoint before it was killed"
    step = int(Path(runs.last_checkpoint(new)).name.split("-")[-1])
    assert snapshot(root / "kill" / "sft") == old  # the finished run is whole while the overwrite was killed
    lock = json.loads(locks.lock_path(compose(root, "run.name=kill").run, "sft").read_text())
    assert lock["pid"] == proc.pid  # the dead writer's lock is still there ...

    with caplog.at_level(logging.INFO):  # ... and is taken over by the next run that starts
        with pytest.raises(AlignError, match="interrupted overwrite"):  # resuming it needs both flags
            run_stage(root, *SFT, "run.name=kill", "run.resume=true")
        assert "no longer running" not in caplog.text  # refused before the lock is touched (runs.check_can_start)
        m = run_stage(root, *SFT, "run.name=kill", "run.overwrite=true", "run.resume=true",
                      f"trainer.max_steps={step + 1}", "seed=7")
        assert f"lock of pid {proc.pid}, which is no longer running" in caplog.text
    assert f"resuming from {new / 'checkpoints' / f'checkpoint-{step}'}" in caplog.text
    assert m["train/global_step"] == step + 1
    out = root / "kill" / "sft"
    assert adapter_bytes(root, "kill") != old["adapter/adapter_model.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output"] == str(out / "adapter") and json.loads(old["manifest.json"]) != manifest
    assert not new.exists() and not (root / "kill" / "sft.old").exists()
    assert not locks.lock_path(compose(root, "run.name=kill").run, "sft").exists()


def test_a_swap_cut_between_its_renames_is_repaired(tmp_path):
    final, new, old = tmp_path / "sft", tmp_path / "sft.new", tmp_path / "sft.old"
    for folder, tag in ((new, "new"), (old, "old")):
        folder.mkdir()
        (folder / "manifest.json").write_text(tag)
    runs.recover_swap(final)  # both finished: the new run had been written whole
    assert (final / "manifest.json").read_text() == "new" and not old.exists() and not new.exists()
    old.mkdir()
    (old / "manifest.json").write_text("old")
    final.rename(new)
    (new / "manifest.json").unlink()  # the new one unfinished: the old run comes back
    runs.recover_swap(final)
    assert (final / "manifest.json").read_text() == "old" and not old.exists()


# ---------------------------------------------------------------------------------------------- locks


def test_a_live_lock_is_refused_in_one_line(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / "lk").mkdir()
        (tmp_path / "lk" / ".sft.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(AlignError) as err:  # the CLI prints it as its one `error:` line, exit 2
            run_stage(tmp_path, *SFT, "run.name=lk")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"another process (pid {sleeper.pid}, host {socket.gethostname()})" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "lk" / "sft").exists()


def test_a_dead_lock_is_taken_over_and_released(tmp_path, caplog):
    cfg = compose(tmp_path, "run.name=dl")
    path = locks.lock_path(cfg.run, "sft")
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        locks.acquire(cfg.run, "sft")
    assert f"lock of pid {dead.pid}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    locks.release(cfg.run, "sft")
    assert not path.exists()
    path.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))  # another host's pid: cannot tell
    with pytest.raises(AlignError, match="host elsewhere"):
        locks.acquire(cfg.run, "sft")


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_skips_a_truncated_newest_checkpoint(finished, tmp_path, caplog):
    shutil.copytree(finished / "base", tmp_path / "ck")
    out = tmp_path / "ck" / "sft"
    (out / "manifest.json").unlink()  # an interrupted run
    weights = out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert runs.last_checkpoint(out) == str(out / "checkpoints" / "checkpoint-1")
    assert "checkpoint-2" in caplog.text and "truncated" in caplog.text
    m = run_stage(tmp_path, *SFT, "run.name=ck", "run.resume=true")  # loading checkpoint-2 would fail
    assert m["train/global_step"] == 2 and runs.is_finished(out)


def test_checkpoint_completeness(tmp_path):
    import torch
    from safetensors.torch import save_file

    ck = tmp_path / "checkpoints"
    for n, files in ((1, {"state.json": "{}", "adapter/adapter_model.safetensors": None}),  # the PPO loop's layout
                     (2, {"adapter_model.safetensors": None}),  # no trainer state
                     (10, {"trainer_state.json": "{trunc", "adapter_model.safetensors": None})):
        for name, text in files.items():
            f = ck / f"checkpoint-{n}" / name
            f.parent.mkdir(parents=True, exist_ok=True)
            if text is None:
                save_file({"w": torch.ones(3)}, str(f))
            else:
                f.write_text(text)
    (ck / "checkpoint-11.tmp").mkdir()
    assert [p.name for p in runs.checkpoints(ck)] == ["checkpoint-1", "checkpoint-2", "checkpoint-10"]
    assert runs.checkpoint_problem(ck / "checkpoint-10") == "trainer_state.json is not valid JSON"
    assert "no trainer_state.json" in runs.checkpoint_problem(ck / "checkpoint-2")
    assert runs.last_checkpoint(tmp_path) == str(ck / "checkpoint-1")


# ---------------------------------------------------------------------------------------------- determinism, secrets


def test_same_seed_gives_byte_identical_adapters(finished, tmp_path):
    run_stage(tmp_path, *SFT, "run.name=again")
    assert adapter_bytes(tmp_path, "again") == adapter_bytes(finished, "base")
    run_stage(tmp_path, *SFT, "run.name=other", "seed=7")
    assert adapter_bytes(tmp_path, "other") != adapter_bytes(finished, "base")


def test_no_training_args_pickle_and_no_token_in_the_outputs(finished):
    out = finished / "base" / "sft"
    assert not list(out.rglob("training_args.bin"))
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists()
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_hydra_logs_are_scrubbed(tmp_path):
    res = cli(*SFT, "run.name=sec", f"run.output_dir={tmp_path}", f"+trainer.extra.hub_token={SECRET}",
              "trainer.max_steps=0")  # fails in the checks, after the logs are written
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer.max_steps=0: expected -1 or >= 1"), res.stderr
    logs = list((tmp_path / "sec" / "logs").rglob("*.yaml"))
    assert {p.name for p in logs} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert not [p for p in logs if SECRET in p.read_text()]
    overrides = next(p for p in logs if p.name == "overrides.yaml").read_text()
    assert "+trainer.extra.hub_token=<redacted>" in overrides and "trainer.max_steps=0" in overrides


def test_sft_killed_mid_run_and_resumed_ends_with_the_uninterrupted_adapter(tmp_path):
    """kill -9 after checkpoint 2 of 4, then run.resume=true: the adapter matches an uninterrupted run's (TRL restores
    the optimizer, scheduler, RNG and data position; equal within float tolerance, in practice bit for bit)."""
    args = [*SFT, "trainer.max_steps=4", "trainer.save_steps=1"]
    run_stage(tmp_path, *args, "run.name=whole")
    kill_after_checkpoint(args, tmp_path, tmp_path / "cut" / "sft", 2)
    run_stage(tmp_path, *args, "run.name=cut", "run.resume=true")
    assert_same_adapter(tmp_path / "whole" / "sft", tmp_path / "cut" / "sft")


def kill_after_checkpoint(args: list, root: Path, out: Path, step: int) -> None:
    """Start `python -m align <args> run.name=cut` and SIGKILL it as soon as checkpoint-<step> is complete."""
    proc = start_cli(*args, "run.name=cut", f"run.output_dir={root}", env={"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while runs.last_checkpoint(out) != str(out / "checkpoints" / f"checkpoint-{step}") and time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL
        proc.result()
    assert not runs.is_finished(out), "the run finished before it could be killed"
    assert runs.last_checkpoint(out) is not None


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    first = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-6), key


@pytest.mark.embedded
def test_an_adapter_from_another_base_or_a_broken_one_is_one_line(finished, tmp_path):
    adapter = finished / "base" / "sft" / "adapter"
    # a small recipe and a prompt file: the check comes when the adapter is loaded, whatever the prompts
    prompts = ["data=instructions", "scope=none", f"eval.prompts=[{ROOT}/data_recipes/tax_assistant/dev.jsonl]"]
    res = cli("stage=safety_eval", "model=smollm2_135m", "tracking=none", f"eval.adapter={adapter}",
              "eval.max_prompts=2", "eval.compare_base=false", f"run.output_dir={tmp_path}", "run.name=x", *prompts)
    assert res.returncode == 2 and one_error_line(res.stderr), res.stderr[-1500:]
    assert f"{adapter}: this adapter was trained on" in res.stderr and "not on the base loaded now" in res.stderr
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AlignError, match="the adapter weights are unreadable") as err:  # the CLI prints it as above
        run_stage(tmp_path, "stage=safety_eval", *TINY, f"eval.adapter={broken}", "eval.max_prompts=2",
                  "eval.compare_base=false", "run.name=y", *prompts)
    assert str(err.value).startswith(f"{broken}: the adapter weights are unreadable") and "\n" not in str(err.value)


def one_error_line(stderr: str) -> bool:
    """One `error:` line and no traceback (model-loading progress bars may come before it)."""
    return sum(line.startswith("error:") for line in stderr.splitlines()) == 1 and "Traceback" not in stderr


def test_a_token_on_the_command_line_reaches_no_file_wandb_included(tmp_path):
    """The W&B run (offline) records the command line and the config; neither may carry the token, nor any other
    file of the run folder (Hydra's logs, config.yaml, manifest, adapter)."""
    res = cli(*SFT, "tracking=wandb", "tracking.mode=offline", "run.name=w", f"run.output_dir={tmp_path}",
              "trainer.max_steps=1", f"+trainer.extra.hub_token={SECRET}")
    assert res.returncode == 0, res.stderr[-2000:]
    files = [p for p in (tmp_path / "w").rglob("*") if p.is_file()]
    assert any("wandb-metadata.json" in p.name for p in files) or any("offline-run" in str(p) for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_dpo_killed_mid_run_and_resumed_ends_with_the_uninterrupted_adapter(tax_sft, tmp_path):
    """The same for dpo, from one SFT adapter: kill -9 after checkpoint 2 of 4, resume, compare."""
    for name in ("whole", "cut"):  # the data build and the sft stage, twice
        shutil.copytree(tax_sft / "p", tmp_path / name)
    dpo = ["stage=dpo", *PREF, PAIR_LENGTH, "trainer.max_steps=4", "trainer.save_steps=1", "trainer.learning_rate=1e-3",
           "trainer.per_device_train_batch_size=1"]
    run_stage(tmp_path, *dpo, "run.name=whole")
    kill_after_checkpoint(dpo, tmp_path, tmp_path / "cut" / "dpo", 2)
    run_stage(tmp_path, *dpo, "run.name=cut", "run.resume=true")
    assert_same_adapter(tmp_path / "whole" / "dpo", tmp_path / "cut" / "dpo")
