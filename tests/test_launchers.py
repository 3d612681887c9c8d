"""Issue #29: the launchers users scale out with, really run with two CPU processes on the tiny model.

Each run goes through tests/launch_probe.py, which records every rank's trained weights (a digest per tensor) and
logged losses. Two processes with a per-device batch of 2 must end with the same weights on both ranks, and log the
losses of one process with a batch of 4 (the same global batch, the same rows in the same order), in fp32 so the
only difference is the order of the sums.
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

from conftest import PREF, ROOT, TINY

PROBE = str(ROOT / "tests" / "launch_probe.py")
CONFIGS = sorted((ROOT / "conf" / "accelerate").glob("*.yaml"))
FP32 = ["model.cpu_bf16=false", "trainer.learning_rate=1e-3", "trainer.max_steps=3", "trainer.save_steps=1000"]
SFT = ["stage=sft", *TINY, *FP32, "data=instructions", "scope=none", "data.max_rows=24"]


def env() -> dict:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator (gloo), where DeepSpeed is installed
    return {"DS_ACCELERATOR": "cpu", **os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def probe(out: Path, *overrides: str, launcher: list[str] | None = None, log: list | None = None) -> list[dict]:
    """Run the probe (in this interpreter, or under `launcher`) and return each rank's record, rank order; the
    run's stderr is appended to `log` where given."""
    cmd = [*(launcher or [sys.executable]), PROBE, str(out), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    if log is not None:
        log.append(res.stderr)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


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
    (record,) = probe(root / "probe", *SFT, f"run.output_dir={root}", "run.name=one",
                      "trainer.per_device_train_batch_size=4")
    return record


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "ddp.yaml", "fsdp.yaml"])
def test_sft_two_processes_match_one(tmp_path, single_sft, launcher):
    cmd, log = TORCHRUN if launcher == "torchrun" else accelerate(launcher), []
    ranks = probe(tmp_path / "probe", *SFT, f"run.output_dir={tmp_path}", "run.name=two",
                  "trainer.per_device_train_batch_size=2", launcher=cmd, log=log)
    # accelerate attaches its FSDP plugin only to GPU process groups: on CPU processes fsdp.yaml trains
    # data-parallel, and the stage says so rather than pass it off as sharded
    sharded = launcher == "fsdp.yaml" and torch.cuda.is_available()
    assert_same_training(ranks, single_sft, "FSDP" if sharded else "MULTI_CPU")
    if launcher == "fsdp.yaml" and not sharded:
        assert "FSDP was asked (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU here" in log[0]
    manifest = json.loads((tmp_path / "two" / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and (tmp_path / "two" / "sft" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_dpo_under_accelerate_matches_one_process(tax_sft, tmp_path):
    """From the session's tax SFT run: on-policy negatives written by each rank, two DPO steps. One process
    precomputes the reference log-probs; two compute them at every step (preference.precompute_ref: TRL's cache of
    them is per process), and the losses must still agree."""
    shutil.copytree(tax_sft / "p", tmp_path / "p")
    dpo = ["stage=dpo", *PREF, *FP32[:2], "trainer.max_steps=2", f"run.output_dir={tmp_path}", "run.name=p",
           "run.overwrite=true"]
    (single,) = probe(tmp_path / "one", *dpo, "trainer.per_device_train_batch_size=4")
    ranks = probe(tmp_path / "two", *dpo, "trainer.per_device_train_batch_size=2", launcher=accelerate("ddp.yaml"))
    assert_same_training(ranks, single, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sft_under_deepspeed_on_the_cpu_matches_one_process(tmp_path, single_sft, config):
    """The optional extra (README: pip install --no-build-isolation ".[deepspeed]"), on DeepSpeed's CPU accelerator
    (gloo); skipped where DeepSpeed is not installed, as in `make test`."""
    pytest.importorskip("deepspeed")
    ranks = probe(tmp_path / "probe", *SFT, f"run.output_dir={tmp_path}", "run.name=ds",
                  "trainer.per_device_train_batch_size=2", launcher=accelerate(config))
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
