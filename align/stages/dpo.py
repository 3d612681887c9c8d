"""Stage dpo: TRL's DPOTrainer on the scope's preference pairs, starting from the SFT stage.

The SFT adapter is loaded trainable; TRL keeps a frozen copy of it as the "ref" adapter, so the
reference is the SFT policy without a second copy of the base. With dpo.precompute_ref=true the
reference log-probs are computed once before training. The saved adapter is relative to the plain
base, so AutoPeftModelForCausalLM loads it.

With peft=full (or bitfit, freeze) every weight of the SFT model trains: a full SFT's model/, or the base
with a LoRA SFT adapter merged in. The reference is that model before training (precomputed log-probs, or
a frozen copy with dpo.precompute_ref=false), and model/ is saved. A full SFT with an adapter method here
is refused (align/preference.py).
"""

from align import AlignError, preference


def run(cfg) -> dict:
    from trl import DPOConfig, DPOTrainer

    losses = cfg.dpo.loss_type
    losses = [losses] if isinstance(losses, str) else list(losses)
    # weights belong to a list of losses; a single loss type (dpo.loss_type=ipo) runs unweighted
    weights = list(cfg.dpo.loss_weights) if cfg.dpo.loss_weights is not None and len(losses) > 1 else None
    if weights is not None and len(weights) != len(losses):
        raise AlignError(f"dpo.loss_weights: {len(weights)} weights for {len(losses)} loss types {losses}")
    return preference.train_from_sft(cfg, "dpo", DPOConfig, DPOTrainer, loss_type=losses, loss_weights=weights,
                                     label_smoothing=cfg.dpo.label_smoothing)
