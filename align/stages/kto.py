"""Stage kto: TRL's KTOTrainer (Kahneman-Tversky optimisation) on unpaired feedback, from the SFT stage.

Each preference pair becomes two unpaired rows: the chosen answer labelled desirable, the rejected one
undesirable. Same reference handling and outputs as the dpo stage, peft=full included.
"""

from align.preference import train_from_sft


def unpaired(pairs: list[dict]) -> list[dict]:
    rows = []
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return rows


def run(cfg) -> dict:
    from trl import KTOConfig, KTOTrainer

    return train_from_sft(cfg, "kto", KTOConfig, KTOTrainer, to_rows=unpaired,
                          desirable_weight=cfg.kto.desirable_weight, undesirable_weight=cfg.kto.undesirable_weight)
