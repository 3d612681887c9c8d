"""The command line: composition, overrides and one-line errors with exit code 2."""

import json

from conftest import TINY, cli


def test_unknown_stage_is_one_line_exit_2():
    res = cli("stage=nonexistent")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "stage" in lines[0] and "sft" in lines[0] and "dpo" in lines[0]
    assert "Traceback" not in res.stderr


def test_unknown_key_and_wrong_type_are_one_line():
    res = cli("stage=sft", "trainer.learning_rat=1e-4")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "trainer.learning_rat" in res.stderr and "learning_rate" in res.stderr
    res = cli("stage=sft", "trainer.max_steps=many")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "trainer.max_steps" in res.stderr
    res = cli("stage=sft", "peft=bogus")
    assert res.returncode == 2 and "lora" in res.stderr and "qlora" in res.stderr


def test_bad_data_source_is_one_line_and_leaves_no_stage_folder(tmp_path):
    res = cli("stage=data", *TINY, f"run.output_dir={tmp_path}", "run.name=x",
              "data.rl_files=[nope.jsonl]")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "data source 'rl_files[0]': file 'nope.jsonl' not found" in res.stderr
    assert not (tmp_path / "x" / "data").exists()


def test_full_error_env_shows_traceback():
    res = cli("stage=nonexistent", env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cfg_job_shows_overrides():
    res = cli("stage=dpo", "peft=qlora", "trainer.learning_rate=5e-6", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    assert "name: dpo" in res.stdout and "load_in_4bit: true" in res.stdout
    assert "learning_rate: 5.0e-06" in res.stdout


def test_help_lists_groups():
    res = cli("--help")
    assert res.returncode == 0
    for group in ("stage:", "model:", "peft:", "data:", "tracking:", "trainer:"):
        assert group in res.stdout


def test_multirun_sweep(tmp_path):
    res = cli("--multirun", "stage=sft", *TINY, "data=instructions", "scope=none", "trainer.max_steps=2",
              "trainer.learning_rate=1e-3,5e-4", f"run.output_dir={tmp_path}", "run.name=sweep")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = sorted(tmp_path.glob("sweep*/sft/metrics.json"))
    assert len(metrics) == 2, list(tmp_path.rglob("metrics.json"))
    lrs = {json.loads((m.parent / "manifest.json").read_text())["run_name"] for m in metrics}
    assert len(lrs) == 2


def test_secrets_are_scrubbed_but_token_counts_are_not():
    from align.runs import scrub

    out = scrub({"wandb": {"api_key": "abc", "hf_token": "x", "token": "y"}, "eval": {"max_new_tokens": 64}})
    assert out["wandb"] == {"api_key": "<redacted>", "hf_token": "<redacted>", "token": "<redacted>"}
    assert out["eval"]["max_new_tokens"] == 64
