"""Issue #29: the launchers users scale out with, really run with two CPU processes on the tiny model.

Each run goes through tests/launch_probe.py, which records every rank's trained weights (a digest per tensor) and
logged losses. Two processes with a per-device batch of 2 must end with the same weights on both ranks, and log the
losses of one process with a batch of 4 (the same global batch, the same rows in the same order), in fp32 so the
only difference is the order of the sums. The one-process runs go through the probe's `main` in the test's own
process, and one launch may carry several runs (ddp.yaml's SFT and DPO): each launch costs two processes' imports.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import launch_probe
from conftest import PAIR_LENGTH, PREF, ROOT, TINY
from launch_probe import SEPARATOR

PROBE = str(ROOT / "tests" / "launch_probe.py")
CONFIGS = sorted((ROOT / "conf" / "accelerate").glob("*.yaml"))
FP32 = ["model.cpu_bf16=false", "trainer.learning_rate=1e-3", "trainer.max_steps=3", "trainer.save_steps=1000"]
SFT = ["stage=sft", *TINY, *FP32, "data=instructions", "scope=none", "data.max_rows=24"]


def env() -> dict:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator (gloo), where DeepSpeed is installed
    return {"DS_ACCELERATOR": "cpu", **os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def launch(launcher: list[str], *runs: tuple[Path, list[str]], log: list | None = None) -> list[list[dict]]:
    """Run the probe under `launcher` once for every (folder, overrides) run, one after another in the same processes
    (the launcher and the imports are paid once); return each run's rank records, rank order. The launch's stderr
    is appended to `log` where given."""
    args = [arg for i, (out, overrides) in enumerate(runs)
            for arg in ([SEPARATOR] if i else []) + [str(out), *overrides]]
    res = subprocess.run([*launcher, PROBE, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    if log is not None:
        log.append(res.stderr)
    return [records(out) for out, _ in runs]


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def one_process(out: Path, *overrides: str) -> dict:
    """The one-process run to compare with, in this test process (no launcher and no second set of imports)."""
    launch_probe.main(str(out), list(overrides))
    (record,) = records(out)
    return record


def accelerate(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate" / config),
            "--num_processes", "2", "--main_process_port", "0"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def assert_same_training(ranks: list[dict], single: dict, kind: str = "MULTI_CPU", world: int = 2,
                         steps: int = 3) -> None:
    assert len(ranks) == world and all(r["world_size"] == world for r in ranks)
    assert {r["distributed_type"] for r in ranks} == {f"DistributedType.{kind}"}  # the launcher's setup was used
    assert ranks[0]["weights"] and all(r["weights"] == ranks[0]["weights"] for r in ranks[1:])  # identical ranks
    assert ranks[0]["weights"].keys() == single["weights"].keys()
    assert len(ranks[0]["losses"]) == len(single["losses"]) == steps
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-3, abs=1e-4), (ranks[0]["losses"],
                                                                                      single["losses"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_accelerate_configs_take_the_process_count_from_the_launcher(path):
    """No config fixes a process count: `accelerate launch --num_processes N` says it (accelerate refuses the
    config without one), and precision is align's (model.dtype, model.cpu_bf16), not the launcher's."""
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    assert "num_processes" not in raw and raw["mixed_precision"] == "no"
    loaded = load_config_from_file(str(path))
    assert loaded.num_processes == -1 and loaded.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    res = subprocess.run([*accelerate(path.name)[:5], PROBE], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "--num_processes" in res.stderr


@pytest.fixture(scope="module")
def single_sft(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single_sft")
    return one_process(root / "probe", *SFT, f"run.output_dir={root}", "run.name=one",
                       "trainer.per_device_train_batch_size=4")


def two_process_sft(root: Path) -> tuple[Path, list[str]]:
    """The SFT run of two processes with a per-device batch of 2 (the single run's global batch of 4)."""
    return root / "probe", [*SFT, f"run.output_dir={root}", "run.name=two", "trainer.per_device_train_batch_size=2"]


def check_two_process_sft(root: Path, ranks: list[dict], single: dict, launcher: str, stderr: str) -> None:
    # accelerate attaches its FSDP plugin only to GPU process groups: on CPU processes fsdp.yaml trains
    # data-parallel, and the stage says so rather than pass it off as sharded
    sharded = launcher == "fsdp.yaml" and torch.cuda.is_available()
    assert_same_training(ranks, single, "FSDP" if sharded else "MULTI_CPU")
    if launcher == "fsdp.yaml" and not sharded:
        assert "FSDP was asked (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU here" in stderr
    manifest = json.loads((root / "two" / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and (root / "two" / "sft" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "fsdp.yaml"])
def test_sft_two_processes_match_one(tmp_path, single_sft, launcher):
    """ddp.yaml's SFT run is test_sft_and_dpo_under_accelerate_ddp_match_one_process's (one launch for two runs)."""
    log = []
    (ranks,) = launch(TORCHRUN if launcher == "torchrun" else accelerate(launcher), two_process_sft(tmp_path), log=log)
    check_two_process_sft(tmp_path, ranks, single_sft, launcher, log[0])


@pytest.mark.slow
def test_sft_and_dpo_under_accelerate_ddp_match_one_process(tax_sft, single_sft, tmp_path):
    """One ddp.yaml launch runs SFT as test_sft_two_processes_match_one does for the other launchers, then DPO from
    the session's tax SFT run: on-policy negatives written by each rank, two DPO steps. One process precomputes the
    reference log-probs; two compute them at every step (preference.precompute_ref: TRL's cache of them is per
    process), and the losses must still agree."""
    shutil.copytree(tax_sft / "p", tmp_path / "p")
    dpo = ["stage=dpo", *PREF, PAIR_LENGTH, *FP32[:2], "trainer.max_steps=2", f"run.output_dir={tmp_path}",
           "run.name=p", "run.overwrite=true"]
    single = one_process(tmp_path / "one", *dpo, "trainer.per_device_train_batch_size=4")
    log = []
    sft_ranks, dpo_ranks = launch(accelerate("ddp.yaml"), two_process_sft(tmp_path),
                                  (tmp_path / "two-dpo", [*dpo, "trainer.per_device_train_batch_size=2"]), log=log)
    check_two_process_sft(tmp_path, sft_ranks, single_sft, "ddp.yaml", log[0])
    assert_same_training(dpo_ranks, single, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sft_under_deepspeed_on_the_cpu_matches_one_process(tmp_path, single_sft, config):
    """The optional extra (README: pip install --no-build-isolation ".[deepspeed]"), on DeepSpeed's CPU accelerator
    (gloo); skipped where DeepSpeed is not installed, as in `make test`."""
    pytest.importorskip("deepspeed")
    (ranks,) = launch(accelerate(config), (tmp_path / "probe", [*SFT, f"run.output_dir={tmp_path}", "run.name=ds",
                                                                "trainer.per_device_train_batch_size=2"]))
    assert_same_training(ranks, single_sft, "DEEPSPEED")
    assert (tmp_path / "ds" / "sft" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_ppo_and_grpo_refuse_a_sharded_launch_in_one_line(tmp_path, monkeypatch, var, stage):
    """What `accelerate launch` with fsdp.yaml or a deepspeed config sets (ppo checked by hand under fsdp.yaml:
    README, #29's note); the refusal comes before any parent stage is looked for."""
    from conftest import run_stage

    from align import AlignError

    monkeypatch.setenv(var, "true")
    with pytest.raises(AlignError, match=f"{stage} does not run under .* \\(launched with {var}=true\\).*ddp.yaml") as e:
        run_stage(tmp_path, f"stage={stage}", *TINY)
    assert "\n" not in str(e.value)
