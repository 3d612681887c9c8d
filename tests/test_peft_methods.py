"""The further peft= methods on the tiny model: (IA)3, prefix, prompt and P-tuning adapters, BitFit and partial
freezing. Each learns, changes only what it should, and refuses in one line where it cannot work."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, run_stage

from align import AlignError, adapters, models

# two rows in one batch of two: every step sees the same batch, so the first and last loss compare like with like
SFT = ["stage=sft", *TINY, "data=instructions", "scope=none", "trainer.max_steps=8", "data.max_rows=2",
       "trainer.per_device_train_batch_size=2"]
PEFT_TYPES = {"ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}
NEW_METHODS = ("ia3", "prefix", "prompt", "ptuning", "bitfit", "freeze")


def tiny_dir() -> str:
    return models.resolve("align://tiny-llama")


def changed(saved: dict, original: dict) -> set[str]:
    """Keys whose tensors differ (shape, dtype or any bit) between two state dicts over the original's keys."""
    assert set(original) <= set(saved), set(original) - set(saved)
    return {k for k, v in original.items() if not (saved[k].dtype == v.dtype and torch.equal(saved[k], v))}


@pytest.mark.parametrize("method", ["ia3", "prefix", "prompt", "ptuning"])
def test_adapter_method_learns_and_leaves_the_base_untouched(tmp_path, method):
    from peft import AutoPeftModelForCausalLM

    # a few thousand parameters on a random model: a large step (prompt tuning papers use 0.3) makes the fall clear
    m = run_stage(tmp_path, *SFT, f"peft={method}", "run.name=a", "trainer.learning_rate=3e-2")
    assert m["train/last_loss"] < m["train/first_loss"], m
    assert 0 < m["trainable_params"] < 0.01 * m["total_params"]
    saved = tmp_path / "a" / "sft" / "adapter"
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPES[method]

    model = AutoPeftModelForCausalLM.from_pretrained(str(saved))  # the base comes fresh from the tiny checkpoint
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "ia3_" not in k}
    assert changed(base, load_file(str(Path(tiny_dir()) / "model.safetensors"))) == set()
    # ... and the trained adapter does change the model's predictions
    ids = torch.tensor([[1, 520, 3000, 42, 7]])
    with torch.no_grad():
        tuned = model(ids).logits[:, -1]
        with model.disable_adapter():
            plain = model(ids).logits[:, -1]
    assert not torch.allclose(tuned, plain)
    if method in ("ia3", "prompt"):  # dpo from this sft adapter refuses in one line, naming method and stage
        with pytest.raises(AlignError, match=f"peft={method} cannot run the dpo stage"):
            run_stage(tmp_path, "stage=dpo", *TINY, "data=tax_assistant", "scope=tax_assistant", "data.max_rows=4",
                      f"peft={method}", "run.name=a")


def test_freeze_trains_only_the_last_blocks_and_the_head(tmp_path):
    m = run_stage(tmp_path, *SFT, "peft=freeze", "peft.freeze_last_n=1", "run.name=f", "trainer.learning_rate=5e-3")
    assert m["train/last_loss"] < m["train/first_loss"], m
    out = tmp_path / "f" / "sft"
    assert not (out / "adapter").exists()
    saved = load_file(str(out / "model" / "model.safetensors"))
    original = load_file(str(Path(tiny_dir()) / "model.safetensors"))
    diff = changed(saved, original)
    assert diff and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in diff), diff
    # the tied output head got its own copy: it trained while the input embeddings stayed frozen
    assert "model.embed_tokens.weight" not in diff
    assert not torch.equal(saved["lm_head.weight"], original["model.embed_tokens.weight"])
    assert json.loads((out / "model" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_freeze_last_n_0_is_the_head_alone(tmp_path, task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    model = cls.from_pretrained(tiny_dir(), num_labels=1) if task == "SEQ_CLS" else cls.from_pretrained(tiny_dir())
    cfg = compose(tmp_path, "stage=sft", *TINY, "peft=freeze", "peft.freeze_last_n=0")
    model = adapters.attach(model, cfg.peft, task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"lm_head.weight"} if task == "CAUSAL_LM" else {"score.weight"})
    assert model.get_input_embeddings().weight.requires_grad is False
    with pytest.raises(AlignError, match="freeze_last_n: expected 0..2"):
        adapters.attach(cls.from_pretrained(tiny_dir()), compose(tmp_path, "peft=freeze", "peft.freeze_last_n=3").peft)


def biased_tiny(tmp_path: Path) -> Path:
    """The tiny Llama with bias terms in attention and MLP (Llama itself has none), saved with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_dir())
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(0)
    folder = tmp_path / "biased-tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_dir()).save_pretrained(folder)
    return folder


def test_bitfit_trains_only_the_biases(tmp_path):
    folder = biased_tiny(tmp_path)
    m = run_stage(tmp_path, *SFT, "peft=bitfit", f"model.name_or_path={folder}", "run.name=b",
                  "trainer.learning_rate=5e-2")
    assert m["train/last_loss"] < m["train/first_loss"], m
    assert m["trainable_share"] < 0.01
    saved = load_file(str(tmp_path / "b" / "sft" / "model" / "model.safetensors"))
    diff = changed(saved, load_file(str(folder / "model.safetensors")))
    assert diff and all(k.endswith(".bias") for k in diff), diff


def test_bitfit_refuses_a_model_without_biases(tmp_path):
    with pytest.raises(AlignError, match="model has no bias parameters; bitfit needs a model with biases"):
        run_stage(tmp_path, *SFT, "peft=bitfit", "run.name=nb")


@pytest.mark.parametrize("stage,method,overrides,match", [
    ("dpo", "ia3", [], "peft=ia3 cannot run the dpo stage: TRL's frozen reference copy"),
    ("grpo", "ia3", [], "peft=ia3 cannot run the grpo stage"),
    ("ppo", "ia3", [], "peft=ia3 cannot run the ppo stage"),
    ("kto", "prompt", [], "peft=prompt cannot run the kto stage: peft cannot load a saved prompt-learning adapter"),
    ("dpo", "prefix", [], "peft=prefix cannot run the dpo stage"),
    ("sft", "ptuning", ["stage.init_from=x"], "peft=ptuning cannot run the sft stage"),
])
def test_stages_that_start_from_the_sft_adapter_refuse_what_cannot_work(tmp_path, stage, method, overrides, match):
    cfg = compose(tmp_path, f"stage={stage}", *TINY, f"peft={method}", *overrides)
    with pytest.raises(AlignError, match=match):
        adapters.attach(None, cfg.peft, "CAUSAL_LM", init_from="outputs/x/sft/adapter")  # refused before loading


def test_sft_may_continue_an_ia3_adapter(tmp_path):
    adapters.check_supported(compose(tmp_path, "stage=sft", *TINY, "peft=ia3").peft, init_from="x")  # no error


@pytest.mark.parametrize("method,overrides,match", [
    ("prompt", ["rm.init=base"], "peft=prompt cannot train the rm stage's reward head"),
    ("ptuning", ["rm.init=base"], "peft=ptuning cannot train the rm stage's reward head"),
    ("ia3", [], "peft=ia3: the rm stage starts from the sft stage's weights only with LoRA methods; set rm.init=base"),
    ("freeze", [], "set rm.init=base"),
])
def test_rm_refusals(tmp_path, method, overrides, match):
    cfg = compose(tmp_path, "stage=rm", *TINY, f"peft={method}", *overrides)
    with pytest.raises(AlignError, match=match):
        adapters.attach(None, cfg.peft, "SEQ_CLS")


@pytest.mark.parametrize("method", ["bitfit", "freeze"])
def test_full_model_methods_refuse_a_4bit_base(tmp_path, method):
    cfg = compose(tmp_path, "stage=sft", *TINY, f"peft={method}", "peft.load_in_4bit=true")
    with pytest.raises(AlignError, match=f"peft={method} cannot train a 4-bit base"):
        adapters.attach(None, cfg.peft)


def test_rm_with_ia3_and_prefix_builds_a_trainable_score_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    for method in ("ia3", "prefix"):
        cfg = compose(tmp_path, "stage=rm", *TINY, f"peft={method}", "rm.init=base")
        model = adapters.attach(AutoModelForSequenceClassification.from_pretrained(tiny_dir(), num_labels=1),
                                cfg.peft, "SEQ_CLS")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("score" in n for n in trainable) and any("score" not in n for n in trainable), trainable


def test_every_new_option_composes_and_saves_where_it_should(tmp_path):
    for method in NEW_METHODS:
        cfg = compose(tmp_path, "stage=sft", f"peft={method}")
        assert cfg.peft.method == method
        assert adapters.saves_full_model(cfg.peft) == (method in ("bitfit", "freeze"))
        lines = (Path(adapters.__file__).parents[1] / "conf" / "peft" / f"{method}.yaml").read_text().splitlines()
        keys = [i for i, line in enumerate(lines) if line and not line.startswith(("#", " ", "defaults"))]
        assert all(lines[i - 1].startswith("#") for i in keys if not lines[i].startswith("method:")), method
    with pytest.raises(AlignError, match="peft.last_n_layers applies to lora, qlora and dora"):
        adapters.peft_config(compose(tmp_path, "peft=ia3", "peft.last_n_layers=1").peft, "CAUSAL_LM")


def _args(tmp_path, optim: str, *extra: str):
    from trl import SFTConfig

    from align import training

    cfg = compose(tmp_path, "stage=sft", *TINY, f"trainer.optim={optim}", *extra)
    return training.trainer_args(cfg, tmp_path, SimpleNamespace(report_to="none"), SFTConfig, has_eval=False)


@pytest.mark.parametrize("optim,package", [("galore_adamw", "galore_torch"), ("lomo", "lomo_optim"),
                                           ("adalomo", "lomo_optim")])
def test_optimizers_from_missing_packages_fail_in_one_line(tmp_path, optim, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(AlignError, match=f"trainer.optim={optim} needs the {package} package") as err:
        _args(tmp_path, optim)
    assert "\n" not in str(err.value)


def test_trainer_extra_reaches_trl_as_plain_lists(tmp_path):
    """GaLore's optim_target_modules must be a list, and transformers refuses OmegaConf's ListConfig."""
    args = _args(tmp_path, "adamw_torch", "+trainer.extra.label_names=[labels]")
    assert type(args.label_names) is list and args.label_names == ["labels"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="AdaLomo runs on CUDA")
def test_adalomo_on_the_cpu_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("lomo_optim") is None:
        pytest.skip("lomo-optim is not installed (the missing-package line is the test above)")
    with pytest.raises(AlignError, match="AdaLomo runs on CUDA only"):
        _args(tmp_path, "adalomo")


def test_bnb_8bit_optimizer_runs_on_cpu(tmp_path):
    """bitsandbytes >= 0.49 ships CPU kernels for its 8-bit optimizers: no refusal, and one step moves a weight."""
    import bitsandbytes as bnb

    assert _args(tmp_path, "adamw_bnb_8bit").optim == "adamw_bnb_8bit"
    weight = torch.nn.Parameter(torch.randn(64, 64))  # >= 4096 values: the state really is 8-bit
    weight.grad = torch.randn(64, 64)
    before = weight.detach().clone()
    opt = bnb.optim.AdamW8bit([weight], lr=1e-2)
    opt.step()
    assert opt.state[weight]["state1"].dtype == torch.uint8 and not torch.equal(before, weight.detach())
