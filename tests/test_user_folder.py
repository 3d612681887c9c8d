"""A user's folder is a project (issue #27): ./conf ahead of the packaged configs, data= brings its scope, the scaffold,
the length budget, and template checks, through the real config composition and the CLI."""

import json

import pytest
from omegaconf import OmegaConf

from align import AlignError
from align.config import compose
from align.data import budget, scope as scope_mod
from conftest import cli


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cwd_conf_adds_options_and_overrides_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "conf/scope/cooking.yaml", "name: cooking\ncapability: cooking questions\n")
    # a file with a shipped option's name replaces it
    write(tmp_path / "conf/scope/tax_assistant.yaml", "name: tax_assistant\ncapability: my own tax card\n")
    assert compose("scope=cooking", set_hydra_config=False).scope.capability == "cooking questions"
    assert compose(set_hydra_config=False).scope.capability == "my own tax card"
    monkeypatch.chdir(tmp_path.parent)  # elsewhere, the shipped card again
    assert compose(set_hydra_config=False).scope.capability == "personal and small-business tax questions"


def test_data_brings_its_scope_unless_scope_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "conf/scope/cooking.yaml", "name: cooking\n")
    write(tmp_path / "conf/data/cooking.yaml", "recipe: cooking\nscope: cooking\n")
    assert compose("data=cooking", set_hydra_config=False).scope.name == "cooking"
    cfg = compose("data=cooking", "scope=none", set_hydra_config=False)
    assert cfg.scope.name == "none" and cfg.data.scope == "cooking"
    # the tax recipe brings the tax card; a generic recipe leaves the scope alone
    assert compose("data=tax_assistant", "scope=none", set_hydra_config=False).data.scope == "tax_assistant"
    assert compose("data=instructions", set_hydra_config=False).scope.name == "tax_assistant"


def run_data_stage(*overrides: str) -> str:
    """The one-line error (the CLI prints an AlignError as `error: <it>`, exit 2) of a data stage that must fail."""
    from align.launch import run_stage

    with pytest.raises(AlignError) as err:
        run_stage(compose("stage=data", "model=tiny", "tracking=none", *overrides, set_hydra_config=False))
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_a_recipe_built_under_another_scope_is_one_line(tmp_path):
    error = run_data_stage("scope=none", f"run.output_dir={tmp_path}")
    assert "data recipe 'tax_scoped' is written for scope 'tax_assistant', but the scope composed is named 'none'" \
        in error
    assert not (tmp_path / "default" / "data").exists()


def test_unknown_option_names_the_folders_it_looked_in(tmp_path):
    write(tmp_path / "conf/scope/cooking.yaml", "name: cooking\n")
    res = cli("stage=data", "scope=cookng", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "unknown option 'cookng' for scope=" in res.stderr and "cooking" in res.stderr
    assert f"looked in {tmp_path}/conf/scope, " in res.stderr


def test_a_placeholder_typo_is_an_error_naming_the_template(tmp_path, monkeypatch):
    card = OmegaConf.create({"refusal_templates": ["Sorry, I only do {capability}, not {topic}."],
                             "unsafe_templates": ["Sorry, I can't. Ask me about {capabilty} instead."]})
    with pytest.raises(AlignError, match=r"scope.unsafe_templates\[0\]: unknown placeholder \{capabilty\}"):
        scope_mod.check_templates(card)
    scope_mod.check_templates(OmegaConf.create({"refusal_templates": card.refusal_templates}))
    with pytest.raises(AlignError, match=r"scope.crisis_templates\[0\]"):
        scope_mod.check_templates(OmegaConf.create({"crisis_templates": ["Call {988"]}))
    # through the data stage, with the card in the user's ./conf: one line, no stage folder
    write(tmp_path / "conf/scope/typo.yaml", "name: typo\nunsafe_templates: ['Ask about {capabilty}']\n")
    monkeypatch.chdir(tmp_path)
    assert "unknown placeholder {capabilty}" in run_data_stage("scope=typo", "data.scope=null")
    assert not (tmp_path / "outputs" / "default" / "data").exists()


class WordTokenizer:
    """One token a word; the chat template is '<s> role: text' per message (system+user head = 2 + words)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = " ".join(f"<s> {m['role']}: {m['content']}" for m in messages)
        return text + (" <s> assistant:" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_length_budget_counts_cut_answers_and_lost_tokens():
    def row(source, question, answer):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "source": source}

    rows = [row("short", "hi there", "one two three"),            # head 6 ("<s> user: hi there <s> assistant:") + 3
            row("long", "hi there", " ".join(["w"] * 20)),        # head 6 + answer 20 = 26: 14 past 12
            row("long", "hi", " ".join(["w"] * 8))]               # head 5 + answer 8 = 13: 1 past 12
    got = {b.source: b for b in budget.measure(rows, WordTokenizer(), max_length=12)}
    assert (got["short"].rows, got["short"].cut, got["short"].lost_tokens) == (1, 0, 0)
    long = got["long"]
    assert (long.rows, long.cut, long.answer_tokens, long.lost_tokens) == (2, 2, 28, 14 + 1)
    line = budget.warn(list(got.values()), 12)
    assert line.startswith("length budget: 1 of 2 sources") and "long 54%" in line
    assert budget.warn([got["short"]], 12) is None


def test_scaffold_refuses_to_overwrite_and_bad_names(tmp_path, monkeypatch):
    from align.launch import run_stage

    monkeypatch.chdir(tmp_path)  # the scaffold writes into the current folder, as `python -m align stage=new` does
    run_stage(compose("stage=new", "scope.name=fitness", set_hydra_config=False))
    rows = [json.loads(line) for line in (tmp_path / "data/fitness/eval.jsonl").read_text().splitlines()]
    assert {r["expected"] for r in rows} == {"answer", "refuse"}
    before = (tmp_path / "conf/scope/fitness.yaml").read_text()
    (tmp_path / "data/fitness/dev.jsonl").write_text("mine\n")
    with pytest.raises(AlignError, match="already exists; stage=new never overwrites"):
        run_stage(compose("stage=new", "scope.name=fitness", set_hydra_config=False))
    assert (tmp_path / "data/fitness/dev.jsonl").read_text() == "mine\n"
    assert (tmp_path / "conf/scope/fitness.yaml").read_text() == before
    bad = cli("stage=new", "scope.name=../x", cwd=tmp_path)
    assert bad.returncode == 2 and "scope.name: '../x' is not a usable name" in bad.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("text,culprit", [
    ("name: x\nsystem_prompt: hi\nhelper:\n  _target_: shutil.rmtree\n  path: /\n", "key '_target_'"),
    ("# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: os.system\n", "may not set '# @package'"),
    ("name: x\nhydra:\n  job:\n    chdir: true\n", "key 'hydra'"),
    ("defaults:\n  - /hydra/callbacks: evil\nname: x\n", "key 'defaults: /hydra/callbacks'"),
])
def test_user_configs_are_data_never_code(tmp_path, text, culprit):
    write(tmp_path / "conf/scope/shared.yaml", text)
    res = cli("stage=data", "scope=shared", "data.scope=null", "model=tiny", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{tmp_path}/conf/scope/shared.yaml" in res.stderr and culprit in res.stderr
    assert not (tmp_path / "outputs").exists()
