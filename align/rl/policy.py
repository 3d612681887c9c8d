"""The one-base, multi-adapter model PPO trains: one base (optionally 4-bit), a PeftModel holding
  "policy"  the SFT adapter, trainable,
  "ref"     a frozen copy of the same SFT adapter: the reference is the SFT policy (not the bare base),
  "reward"  the rm stage's adapter, frozen, with its score head kept beside it (align/rl/reward.py),
and a value head Linear(hidden, 1) on the policy's last hidden states: the critic shares the policy's
forward pass, but reads them detached and its gradients are clipped apart from the policy's. With the value
loss reaching the policy adapter (the classic shared actor-critic) its gradient was 10-60x the policy's, and
after joint clipping the critic set the update (docs/benchmarks.md, round 7). Only the policy adapter and the
value head require grad. LoRA copies are megabytes; the base is loaded once.

Here: switching adapters (use_adapter), the decoder's pieces (backbone, lm_head, last_hidden), loading the
policy (load_policy), the trainable module (PolicyValue, new_value_head), and saving/loading one adapter's
weights and the value head in PEFT's and safetensors' formats.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from align import AlignError, adapters, runs

POLICY, REF, REWARD = "policy", "ref", "reward"


def same_base(stage_dir: Path, name_or_path: str) -> Path:
    """All adapters share one base: refuse a parent stage folder trained on another model than `name_or_path`
    (model.name_or_path)."""
    if runs.is_finished(stage_dir):
        base = runs.read_manifest(stage_dir).get("base_model")
        if base and base != name_or_path:
            raise AlignError(f"{stage_dir} was trained on {base}, but model.name_or_path is "
                             f"{name_or_path}; run this stage with the same model")
    return stage_dir


@contextmanager
def use_adapter(model, name: str):
    """Run with adapter `name` active, then restore the previous adapter and every requires_grad flag
    (peft's set_adapter makes the adapter it activates trainable)."""
    previous = model.active_adapter
    if name == previous:
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def backbone(model):
    """The decoder stack under a PeftModel / CausalLM (LoRA layers are injected in place, so calling it
    runs the active adapter)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def lm_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state


def hidden_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config().hidden_size


def disable_dropout(model: nn.Module) -> None:
    """PPO compares log-probs of the same tokens at rollout and update time: dropout would make them differ.
    It also makes the reward adapter's scores deterministic without switching to eval mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def check_adapter_method(peft_cfg, stage: str) -> None:
    """ppo and grpo keep the policy, its reference and the reward model as adapters on one frozen base: a method
    that trains the whole model (peft=full, bitfit, freeze) is refused in one line, before anything loads."""
    if adapters.saves_full_model(peft_cfg):
        raise AlignError(f"peft={peft_cfg.method} cannot run the {stage} stage: {stage} keeps the policy, its reference "
                         f"and the reward model as adapters on one frozen base; run sft, rm and {stage} with "
                         f"peft=lora, qlora or dora, or use dpo or kto with peft={peft_cfg.method}")


def load_policy(model_cfg, peft_cfg, tokenizer, sft_adapter: Path | str):
    """The base of `model_cfg` (the model section; 4-bit if peft_cfg.load_in_4bit) with the SFT adapter twice:
    "policy" (trainable) and "ref" (frozen reference). Dropout off. Returns the PeftModel with "policy" active."""
    from peft import prepare_model_for_kbit_training

    from align import models

    sft_adapter = Path(sft_adapter)
    adapters.check_supported(peft_cfg, stage="ppo", init_from=sft_adapter)
    check_adapter_method(peft_cfg, "ppo")
    if not (sft_adapter / "adapter_config.json").exists():
        raise AlignError(f"ppo trains a LoRA-family adapter on a frozen base: {sft_adapter} is not a PEFT adapter "
                         f"folder; run sft with peft=lora, qlora or dora (peft=full is not supported by ppo)")
    base = models.load_model(model_cfg, peft_cfg, "causal", tokenizer)
    if peft_cfg.load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = adapters.load(base, sft_adapter, adapter_name=POLICY, is_trainable=True)
    model.load_adapter(str(sft_adapter), adapter_name=REF, is_trainable=False)
    model.set_adapter(POLICY)
    disable_dropout(model)
    return model


def check_trainable(model) -> None:
    """Only the policy adapter may require grad inside the PeftModel (the value head lives outside it)."""
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and f".{POLICY}." not in n]
    if wrong:
        raise AlignError(f"ppo: parameters outside the policy adapter require grad, e.g. {wrong[0]}")
    if not any(p.requires_grad for p in model.parameters()):
        raise AlignError("ppo: the policy adapter has no trainable parameters")


class PolicyValue(nn.Module):
    """The trainable part, as one module (what DDP wraps): the policy adapter inside the PeftModel
    and the value head. forward -> (logits, values) at the R positions predicting the response tokens."""

    def __init__(self, model, value_head: nn.Linear):
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(self, input_ids, attention_mask, n_response: int, temperature: float = 1.0):
        hidden = last_hidden(self.model, input_ids, attention_mask)[:, -n_response - 1:-1]
        logits = lm_head(self.model)(hidden).float() / temperature
        # detached: the value loss trains the value head only, never the policy adapter
        values = self.value_head(hidden.detach().to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups clipped each on its own: the policy adapter, the value head."""
        head = {id(p) for p in self.value_head.parameters()}
        return [[p for p in self.trainable() if id(p) not in head], list(self.value_head.parameters())]


def new_value_head(model) -> nn.Linear:
    """Linear(hidden, 1) starting at zero: initial values 0, no noise in the first advantages."""
    emb = model.get_input_embeddings().weight
    head = nn.Linear(hidden_size(model), 1, dtype=torch.float32, device=emb.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head



# ----------------------------------------------------------------------------------------------
# saving and loading one adapter and the value head
# ----------------------------------------------------------------------------------------------


def save_adapter(model, adapter_name: str, folder: Path) -> None:
    """Save one adapter in PEFT's format at the top of `folder` (AutoPeftModel* loads it as "default");
    peft's save_pretrained would put a non-default adapter in a subfolder."""
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(folder))


def load_adapter_weights(model, adapter_name: str, folder: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k]
    if missing:
        raise AlignError(f"checkpoint {folder}: adapter weights missing, e.g. {missing[0]}")


def save_value_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_value_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict({k: v.to(head.weight.device) for k, v in load_file(str(path)).items()})
