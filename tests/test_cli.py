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
              "trainer.per_device_train_batch_size=2", "trainer.learning_rate=1e-3,5e-4", f"run.output_dir={tmp_path}",
              "run.name=sweep")
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


def leaf_fields(cls, prefix=""):
    """Dotted keys of every field that is not itself a dataclass; a list of dataclasses adds its items' fields."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from leaf_fields(t, f"{prefix}{f.name}.")
            continue
        yield prefix + f.name
        item = next(iter(typing.get_args(t)), None)
        if typing.get_origin(t) is list and dataclasses.is_dataclass(item):
            yield from leaf_fields(item, f"{prefix}{f.name}[].")


def help_options(stdout: str) -> dict:
    """key -> (its line, its help text) from `python -m align --help`."""
    import re

    out, key = {}, None
    for line in stdout.splitlines():
        m = re.match(r"^  (\S+) = ", line)
        if m:
            key = m.group(1)
            assert key not in out, key
            out[key] = [line, ""]
        elif key and line.startswith(" " * 6):
            out[key][1] += " " + line.strip()
        else:
            key = None
    return out


def test_help_prints_every_option_with_its_default_help_and_range():
    from align.config import AlignConfig

    res = cli("--help")
    assert res.returncode == 0, res.stderr
    shown = help_options(res.stdout)
    leaves = list(leaf_fields(AlignConfig))
    assert len(shown) == len(leaves) and set(shown) == set(leaves)
    assert all(text.strip() for _, text in shown.values()), [k for k, (_, t) in shown.items() if not t.strip()]
    line, text = shown["trainer.max_steps"]
    assert line == "  trainer.max_steps = -1  (range: -1 or >= 1)" and "total optimizer steps" in text
    line, text = shown["eval.max_new_tokens"]
    assert line == "  eval.max_new_tokens = 48  (range: >= 1)" and "scripts/check_judge_cut.py" in text
    assert shown["dpo.label_smoothing"][0].endswith("(range: in [0, 0.5))")
    assert shown["dpo.loss_weights"][0].endswith("(range: each >= 0)")
    assert shown["data.sources[].weight"][0] == "  data.sources[].weight = null  (range: >= 0)"
    assert "public-dataset format" in shown["data.sources[].format"][1]
    # a group's file sets the value composed; the declared default is shown beside it
    assert shown["data.eval_fraction"][0] == "  data.eval_fraction = 0.05  (range: in [0, 1); declared default: 0.0)"
    assert "*tax_assistant" in res.stdout and "*pipeline" in res.stdout


def test_help_shows_the_values_the_overrides_give_and_hydra_help_is_hydras():
    res = cli("stage=ppo", "ppo.kl_coef=0.3", "--help")
    assert res.returncode == 0, res.stderr
    shown = help_options(res.stdout)
    assert shown["ppo.num_updates"][0] == "  ppo.num_updates = 30  (range: >= 1; declared default: 20)"
    assert shown["ppo.kl_coef"][0] == "  ppo.kl_coef = 0.3  (range: >= 0; declared default: 0.05)"
    res = cli("trainer.learning_rat=1", "--help")  # a typo: the declared defaults, with a note naming the key
    assert res.returncode == 0 and "trainer.learning_rat" in res.stdout
    assert "trainer.learning_rate = 0.0002" in res.stdout
    res = cli("--hydra-help")
    assert res.returncode == 0 and "== Flags ==" in res.stdout and "--cfg" in res.stdout
