"""Issue #29, presets that load: each hub preset in conf/model/ is checked against the config.json facts shipped for
it (data_recipes/models/<preset>.json). Its architecture is built on the meta device (no weights, no hub), its
parameter count matches the published size, and the project's LoRA config (peft=lora: all-linear) finds its
targets in every block."""

import json

import pytest
import torch

from conftest import ROOT

# preset -> (hub id, published parameter count in billions, linear layers LoRA adapts per block)
PRESETS = {"qwen2_5_0_5b": ("Qwen/Qwen2.5-0.5B-Instruct", 0.494, 7),
           "smollm2_360m": ("HuggingFaceTB/SmolLM2-360M-Instruct", 0.362, 7),
           "llama3_1_8b": ("meta-llama/Llama-3.1-8B-Instruct", 8.030, 7)}


def test_every_hub_preset_has_facts():
    shipped = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")} - {"tiny", "smollm2_135m"}  # both built here
    assert shipped == set(PRESETS) == {p.stem for p in (ROOT / "data_recipes" / "models").glob("*.json")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_architecture_builds_on_meta_and_takes_lora(preset):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from align import adapters
    from align.config import compose

    hub_id, billions, per_block = PRESETS[preset]
    cfg = compose(f"model={preset}", "peft=lora", set_hydra_config=False)
    assert cfg.model.name_or_path == hub_id and not cfg.model.trust_remote_code
    facts = json.loads((ROOT / "data_recipes" / "models" / f"{preset}.json").read_text())
    assert hub_id in facts.pop("_about")
    config = AutoConfig.for_model(**facts)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == facts["architectures"][0]
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.0005)
    peft_model = get_peft_model(model, adapters.peft_config(cfg.peft, "CAUSAL_LM", model))
    adapted = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert len(adapted) == per_block * facts["num_hidden_layers"]
    assert not any("lm_head" in name or "embed" in name for name in adapted)
