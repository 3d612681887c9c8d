"""The pipeline on the tiny model: the whole chain, skipping finished stages, force, stop and resume."""

import json
import shutil

import pytest
import yaml

from conftest import TINY, copy_run, run_stage, shared

from align import AlignError

FAST = [*TINY, "data.max_rows=4", "trainer.max_steps=2", "trainer.max_length=128", "eval.max_new_tokens=6",
        "eval.max_prompts=10", "trainer.per_device_train_batch_size=2"]
SFT3 = 'pipeline.overrides.sft=["trainer.max_steps=3"]'  # one stage's own override, over the shared ones
DPO_CHAIN = "pipeline.stages=[data,sft,rm,dpo]"


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    """The output folder of the whole chain (data, sft, rm, dpo, safety_eval), run once as `run.name=pipe` with FAST
    and SFT3; each test copy_runs it into its own tmp_path."""
    return shared(tmp_path_factory, "pipeline",
                  lambda root: run_stage(root, "stage=pipeline", *FAST, "run.name=pipe", SFT3))


def test_pipeline_runs_chain_then_skips(finished_chain, tmp_path):
    copy_run(finished_chain, tmp_path)  # the first run: the whole chain
    root = tmp_path / "pipe"
    for stage in ("data", "sft", "rm", "dpo", "safety_eval"):
        assert (root / stage / "manifest.json").exists(), stage
    dpo = json.loads((root / "dpo" / "manifest.json").read_text())
    assert "sft" in dpo["parents"] and dpo["run_name"] == "pipe"
    report = (root / "report.md").read_text()
    assert "| OS |" in report and "| sft |" in report and "safety_eval" in report
    sft_cfg = yaml.safe_load((root / "sft" / "config.yaml").read_text())
    assert sft_cfg["trainer"]["max_steps"] == 3 and sft_cfg["stage"]["name"] == "sft"  # its own override won
    rm_cfg = yaml.safe_load((root / "rm" / "config.yaml").read_text())
    assert rm_cfg["trainer"]["max_steps"] == 2 and rm_cfg["trainer"]["max_length"] == 128  # the shared ones reached it

    stamp = (root / "sft" / "manifest.json").read_text()
    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", SFT3)
    assert set(out["timings"].values()) == {"skipped"}
    assert (root / "sft" / "manifest.json").read_text() == stamp
    took = json.loads(stamp)["seconds"]
    rerun = (root / "report.md").read_text()  # the times the stages took when they ran survive a rerun
    assert f"| sft | skipped (took {took:.0f}) |" in rerun and "all stages as run:" in rerun

    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", SFT3, "pipeline.force=[safety_eval]")
    assert out["timings"]["safety_eval"] != "skipped" and out["timings"]["sft"] == "skipped"


def test_pipeline_redoes_exactly_what_is_stale(finished_chain, tmp_path, caplog):
    copy_run(finished_chain, tmp_path)
    root = tmp_path / "pipe"
    # one upstream option changed: that stage and everything after it, nothing before, and the log says why
    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", DPO_CHAIN, SFT3, "rm.tie_epsilon=0.01")
    assert out["timings"]["data"] == out["timings"]["sft"] == "skipped"
    assert out["timings"]["rm"] != "skipped" and out["timings"]["dpo"] != "skipped"
    assert "rm is out of date (rm.tie_epsilon changed)" in caplog.text
    # a stage redone on its own makes the stages built on it stale (the parents' hashes no longer match)
    rm_stamp = (root / "rm" / "manifest.json").read_text()
    run_stage(tmp_path, "stage=sft", *FAST, "run.name=pipe", "run.overwrite=true", "trainer.max_steps=3",
              "trainer.learning_rate=1e-3")
    caplog.clear()
    sft_lr = 'pipeline.overrides.sft=["trainer.max_steps=3","trainer.learning_rate=1e-3"]'  # that same sft
    rm_chain = ["pipeline.stages=[data,sft,rm]", "rm.tie_epsilon=0.01", sft_lr]  # dpo left out: it costs the most
    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", *rm_chain)
    assert out["timings"]["sft"] == "skipped" and out["timings"]["rm"] != "skipped"
    assert "rm is out of date (its parent sft" in caplog.text
    assert (root / "rm" / "manifest.json").read_text() != rm_stamp
    # force=[x] redoes x and everything downstream
    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", *rm_chain, "pipeline.force=[sft]")
    assert [out["timings"][s] == "skipped" for s in ("data", "sft", "rm")] == [True, False, False]
    # report.md names what the stages were built from, read from their manifests
    base = json.loads((root / "sft" / "manifest.json").read_text())["base_model"]
    assert f"Base model `{base}`" in (root / "report.md").read_text()


def test_failing_stage_stops_with_one_line_and_rerun_resumes(finished_chain, tmp_path):
    copy_run(finished_chain, tmp_path)
    for stage in ("rm", "dpo", "safety_eval"):  # a run whose chain got as far as sft
        shutil.rmtree(tmp_path / "pipe" / stage)
    stamp = (tmp_path / "pipe" / "sft" / "manifest.json").read_text()
    with pytest.raises(AlignError, match="pipeline stopped at rm"):
        run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", SFT3, "rm.init=nonsense")
    assert (tmp_path / "pipe" / "sft" / "manifest.json").read_text() == stamp
    assert not (tmp_path / "pipe" / "rm" / "manifest.json").exists() and not (tmp_path / "pipe" / "dpo").exists()
    out = run_stage(tmp_path, "stage=pipeline", *FAST, "run.name=pipe", SFT3, "pipeline.stages=[data,sft,rm]")
    assert out["timings"]["sft"] == "skipped" and out["timings"]["rm"] != "skipped"


def test_overrides_for_a_stage_outside_the_chain_are_rejected(tmp_path):
    with pytest.raises(AlignError, match="pipeline.overrides: 'ppo'"):
        run_stage(tmp_path, "stage=pipeline", *FAST, 'pipeline.overrides.ppo=["trainer.max_steps=3"]')


def test_unknown_policy_is_rejected(tmp_path):
    with pytest.raises(AlignError, match="pipeline.policy"):
        run_stage(tmp_path, "stage=pipeline", *FAST, "pipeline.policy=sppo")


def test_ppo_policy_brings_rm_defaults_that_user_overrides_beat():
    from align.config import compose
    from align.stages.pipeline import compose_stage

    cfg = compose("stage=pipeline", "pipeline.policy=ppo", "run.name=p")
    rm = compose_stage(cfg, "rm", [])
    assert rm.trainer.max_steps == 180 and rm.trainer.learning_rate == 3e-4 and rm.stage.name == "rm"
    assert rm.trainer.max_length == 128 and rm.data.chosen_source == "policy"
    assert rm.data.over_refusal_topic == "off_scope"
    chain = compose_stage(cfg, "ppo", [])
    assert chain.ppo.rule_weight == 3.0  # the chain's ppo; stage=ppo alone keeps 0
    assert compose("stage=ppo").ppo.rule_weight == 0.0
    # the chain keeps the checkpoint best on the recipe's dev prompts, whichever recipe that is
    assert list(chain.ppo.select_prompts) == list(chain.data.dev_files) and chain.data.dev_files
    other = compose_stage(compose("stage=pipeline", "pipeline.policy=ppo", "data.dev_files=[mine.jsonl]"), "ppo", [])
    assert list(other.ppo.select_prompts) == ["mine.jsonl"] and not compose("stage=ppo").ppo.select_prompts
    assert compose_stage(cfg, "sft", []).trainer.max_steps == compose("stage=sft").trainer.max_steps
    # the dpo chain keeps the rm stage's own settings
    assert compose_stage(compose("stage=pipeline", "run.name=p"), "rm", []).trainer.max_steps == 20
    # your shared and per-stage overrides both win over the policy's defaults
    assert compose_stage(compose("stage=pipeline", "pipeline.policy=ppo", "trainer.max_steps=3"), "rm",
                         []).trainer.max_steps == 3
    cfg = compose("stage=pipeline", "pipeline.policy=ppo", 'pipeline.overrides.rm=["trainer.learning_rate=1e-5"]')
    rm = compose_stage(cfg, "rm", [])
    assert rm.trainer.learning_rate == 1e-5 and rm.trainer.max_steps == 180
