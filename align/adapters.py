"""PEFT method presets -> peft configs, and attaching/loading adapters on a base model.

Adapter methods (saved as adapter/, loadable with AutoPeftModel*): lora, qlora, dora, ia3 and the
prompt-learning methods prefix, prompt, ptuning. Methods without an adapter (saved as model/): full,
bitfit (bias terms only) and freeze (the last peft.freeze_last_n blocks plus the head).
"""

import logging

from pathlib import Path

import torch

from align import AlignError

log = logging.getLogger(__name__)

LORA_METHODS = ("lora", "qlora", "dora")
PROMPT_METHODS = ("prefix", "prompt", "ptuning")
ADAPTER_METHODS = LORA_METHODS + ("ia3",) + PROMPT_METHODS
FULL_MODEL_METHODS = ("full", "bitfit", "freeze")
METHODS = ADAPTER_METHODS + FULL_MODEL_METHODS
HEADS = ("lm_head", "score", "classifier")
# stages that start from the SFT adapter and let TRL keep a frozen copy of it as the "ref" adapter
REF_COPY_STAGES = ("dpo", "kto", "grpo")


def saves_full_model(pcfg) -> bool:
    """True when the method trains weights of the model itself (no adapter): the stage saves model/."""
    return pcfg.method in FULL_MODEL_METHODS


def linear_names(model) -> list[str]:
    """What peft's "all-linear" means, spelled out (peft needs names when only some layers are adapted)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and not name.endswith(HEADS)})


def peft_config(pcfg, task_type: str, model=None):
    """The peft config for cfg.peft (None for the methods without an adapter: full, bitfit, freeze)."""
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig)

    if pcfg.method not in METHODS:
        raise AlignError(f"peft.method: unknown method {pcfg.method!r}; choices: {', '.join(METHODS)}")
    if pcfg.last_n_layers and pcfg.method not in LORA_METHODS:
        hint = "; use peft.freeze_last_n" if pcfg.method == "freeze" else ""
        raise AlignError(f"peft.last_n_layers applies to lora, qlora and dora, not peft={pcfg.method}{hint}")
    if saves_full_model(pcfg):
        return None
    if pcfg.method in PROMPT_METHODS:
        if pcfg.num_virtual_tokens < 1:
            raise AlignError(f"peft.num_virtual_tokens: expected >= 1, got {pcfg.num_virtual_tokens}")
        cls = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "ptuning": PromptEncoderConfig}
        return cls[pcfg.method](num_virtual_tokens=pcfg.num_virtual_tokens, task_type=task_type)
    target = pcfg.target_modules
    if target is not None and not isinstance(target, str):
        target = list(target)
    if pcfg.method == "ia3":
        # target_modules=null: peft's per-architecture default (k_proj, v_proj, down_proj on Llama), the paper's choice
        feedforward = None
        if target is not None:
            names = linear_names(model) if target == "all-linear" and model is not None else target
            feedforward = [n for n in names if n in ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")] \
                if isinstance(names, list) else None
            target = names
        return IA3Config(target_modules=target, feedforward_modules=feedforward, task_type=task_type)
    layers = None
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if pcfg.last_n_layers:
        if not num_layers or not 0 < pcfg.last_n_layers <= num_layers:
            raise AlignError(f"peft.last_n_layers: expected 1..{num_layers}, got {pcfg.last_n_layers}")
        layers = list(range(num_layers - pcfg.last_n_layers, num_layers))
        if target == "all-linear":
            target = linear_names(model)
    return LoraConfig(
        layers_to_transform=layers,
        r=pcfg.r,
        lora_alpha=pcfg.lora_alpha,
        lora_dropout=pcfg.lora_dropout,
        target_modules=target,
        use_dora=pcfg.use_dora or pcfg.method == "dora",
        task_type=task_type,
    )


def _root(pcfg):
    """The composed config pcfg belongs to (None for a plain object), to read stage.name and rm.init."""
    try:
        return pcfg._get_root()
    except AttributeError:
        return None


def _stage_of(pcfg, task_type: str, init_from) -> str:
    """The running stage's name, for error messages."""
    root = _root(pcfg)
    name = root.get("stage", {}).get("name") if root is not None else None
    if isinstance(name, str) and name != "pipeline":
        return name
    return "rm" if task_type == "SEQ_CLS" else ("current" if init_from else "sft")


def check_supported(pcfg, task_type: str = "CAUSAL_LM", stage: str | None = None, init_from=None,
                    trainable: bool = True) -> None:
    """One-line AlignError for a method/stage combination that cannot work, before any weight is touched."""
    method = pcfg.method
    stage = stage or _stage_of(pcfg, task_type, init_from)
    if method not in METHODS:
        raise AlignError(f"peft.method: unknown method {method!r}; choices: {', '.join(METHODS)}")
    if not trainable:
        return
    if pcfg.load_in_4bit and method in FULL_MODEL_METHODS:
        raise AlignError(f"peft={method} cannot train a 4-bit base (it trains the model's own weights); "
                         f"use peft=qlora or drop peft.load_in_4bit")
    if method in ("prompt", "ptuning") and task_type == "SEQ_CLS":
        # peft feeds inputs_embeds with the virtual tokens prepended, so the model cannot find the last real
        # token of a right-padded sequence and would read the reward at padding
        raise AlignError(f"peft={method} cannot train the {stage} stage's reward head (the score would be read at "
                         f"padding tokens); use peft=prefix, ia3 or lora for the reward model")
    if init_from and method in PROMPT_METHODS:
        raise AlignError(f"peft={method} cannot run the {stage} stage: peft cannot load a saved prompt-learning "
                         f"adapter as trainable, so training cannot continue from it; use peft=lora, qlora or dora")
    if init_from and method == "ia3" and stage in REF_COPY_STAGES:
        raise AlignError(f"peft=ia3 cannot run the {stage} stage: TRL's frozen reference copy of the sft adapter "
                         f"copies only LoRA-style weights (the reference would be the base); use peft=lora or dora")
    if init_from and method == "ia3" and stage == "ppo":
        raise AlignError("peft=ia3 cannot run the ppo stage: align's PPO checks and syncs LoRA-style adapter weights "
                         "only; use peft=lora, qlora or dora")
    root = _root(pcfg)
    if stage == "rm" and method not in LORA_METHODS + ("full",) and root is not None \
            and (root.get("rm", {}).get("init") == "sft" or root.get("stage", {}).get("init_from")):
        raise AlignError(f"peft={method}: the {stage} stage starts from the sft stage's weights only with LoRA "
                         f"methods; set rm.init=base to train the {method} reward model from the base")


def attach(model, pcfg, task_type: str = "CAUSAL_LM", init_from: str | None = None, trainable: bool = True,
           stage: str | None = None):
    """Wrap the base with a new adapter, or with the adapter saved at `init_from`; for bitfit and freeze,
    set requires_grad on the model's own weights instead."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_supported(pcfg, task_type, stage, init_from, trainable)
    if pcfg.load_in_4bit and trainable:
        # keeps norms in fp32 and enables input grads; checkpointing is the trainer's decision
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if init_from:
        return load(model, init_from, is_trainable=trainable)
    config = peft_config(pcfg, task_type, model)
    if config is None:
        if pcfg.load_in_4bit:
            raise AlignError(f"peft={pcfg.method} cannot train a 4-bit base; use peft=qlora or drop load_in_4bit")
        if pcfg.method == "bitfit":
            return bitfit(model, task_type)
        if pcfg.method == "freeze":
            return freeze(model, pcfg.freeze_last_n, task_type)
        return model
    return get_peft_model(model, config)


def load(model, path, **kwargs):
    """PeftModel.from_pretrained with one-line errors: an adapter trained on another base names both bases; broken
    or missing adapter files name the folder (instead of a size-mismatch or safetensors traceback)."""
    import json

    from peft import PeftModel

    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.exists():
        raise AlignError(f"{folder}: no adapter_config.json; is this an adapter folder (a stage's adapter/)?")
    try:
        trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignError(f"{config_file}: unreadable ({e}); rerun the stage that wrote it") from None
    try:
        return PeftModel.from_pretrained(model, str(folder), **kwargs)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        base = getattr(model.config, "_name_or_path", "?")
        raise AlignError(f"{folder}: this adapter was trained on {trained_on}, not on the base loaded now ({base}); "
                         f"pass the model= it was trained with") from None
    except Exception as e:  # safetensors' own error types vary by version: name the folder, not the traceback
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader") and \
                "safetensors" not in f"{type(e).__module__} {e}".lower():
            raise
        raise AlignError(f"{folder}: the adapter weights are unreadable ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); rerun the stage that wrote it") from None


def _head_names(model) -> list[str]:
    """Parameter names of the output head: lm_head for a causal LM, score/classifier for a reward model."""
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in HEADS]


def bitfit(model, task_type: str = "CAUSAL_LM"):
    """BitFit (Ben Zaken et al. 2022): train only the bias terms (plus a freshly initialised reward head)."""
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if not biases:
        raise AlignError("model has no bias parameters; bitfit needs a model with biases")
    train = set(biases)
    if task_type == "SEQ_CLS":
        train |= set(_head_names(model))  # the score head is new: it has to learn
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    return model


def _blocks(model):
    """The transformer blocks: the ModuleList with num_hidden_layers entries (model.layers, h, blocks, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return name, mod
    raise AlignError("peft=freeze: cannot find the model's transformer blocks (a ModuleList of num_hidden_layers)")


def untie_output_head(model) -> bool:
    """Give lm_head its own copy of the tied input embeddings, so training the head leaves the embeddings alone."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None:
        text.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    return True


def freeze(model, last_n: int, task_type: str = "CAUSAL_LM"):
    """Train the last `last_n` transformer blocks (+ the final norm) and the head; freeze everything else.
    last_n=0 trains the head alone on frozen features (the feature-based baseline)."""
    prefix, blocks = _blocks(model)
    if not 0 <= last_n <= len(blocks):
        raise AlignError(f"peft.freeze_last_n: expected 0..{len(blocks)}, got {last_n}")
    if task_type != "SEQ_CLS" and untie_output_head(model):
        log.info("peft=freeze: untied lm_head from the input embeddings so the embeddings stay frozen")
    train = set(_head_names(model))
    if not train:
        raise AlignError("peft=freeze: cannot find the model's output head (lm_head, score or classifier)")
    first = len(blocks) - last_n
    body = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    for name, _ in model.named_parameters():
        rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        if rest is not None and int(rest.split(".", 1)[0]) >= first:
            train.add(name)
        elif last_n and body and name.startswith(f"{body}.") and name[len(body) + 1:].split(".")[0] in (
                "norm", "final_layer_norm", "ln_f", "final_layernorm"):
            train.add(name)
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    return model


def param_counts(model) -> dict:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}


def _numel(p: torch.nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the logical parameters
    if hasattr(p, "quant_state") and p.quant_state is not None:
        return int(torch.Size(p.quant_state.shape).numel())
    return p.numel()


def merged_model(model_cfg, peft_cfg, tokenizer, sft_dir, head: str = "causal"):
    """The SFT stage's policy as one plain model, for the stages that train every weight (peft=full, bitfit,
    freeze): a full SFT's model/ as saved, or the base with the SFT adapter merged in (peft's merge_and_unload), so
    training goes on from what SFT learned, never from the bare base. head='score' keeps that backbone under a
    fresh scalar head (the rm stage)."""
    from align import models

    sft_dir = Path(sft_dir)
    if (sft_dir / "config.json").exists():
        return models.load_model(model_cfg, peft_cfg, head, tokenizer, path=sft_dir)
    loaded = load(models.load_model(model_cfg, peft_cfg, "causal", tokenizer), sft_dir)
    if loaded.active_peft_config.is_prompt_learning:  # soft prompts live beside the weights, not in them
        raise AlignError(f"{sft_dir}: a {loaded.active_peft_config.peft_type} adapter has no weights to merge into "
                         f"the base for peft={peft_cfg.method}; run sft with peft=lora, qlora, dora or ia3, or full")
    merged = loaded.merge_and_unload().requires_grad_(True)  # peft froze the base; attach decides what trains
    if head == "causal":
        return merged
    model = models.load_model(model_cfg, peft_cfg, head, tokenizer)
    # the decoder stacks of *ForCausalLM and *ForSequenceClassification share their keys (base_model_prefix)
    getattr(model, model.base_model_prefix).load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
    return model
