"""PPO's checkpoints: checkpoint-N/ folders under <stage folder>/checkpoints, whole or absent.

    checkpoint-N/adapter/                 the policy adapter in PEFT's format
    checkpoint-N/value_head.safetensors   the value head
    checkpoint-N/optimizer.pt             the optimizer's state
    checkpoint-N/state.json               the loop's state (align/rl/ppo.py's LoopState as a dict)
    checkpoint-N/rng_state_<rank>.pt      each process's RNG state, so a resumed run repeats the original exactly

Which checkpoints exist and which is the newest complete one is align/runs.py's (checkpoints, last_checkpoint),
shared with the TRL stages.
"""

import json
import random
import shutil
from pathlib import Path

import torch

from align import runs
from align.rl.policy import POLICY, PolicyValue, load_adapter_weights, load_value_head, save_adapter, save_value_head


def save_checkpoint(folder: Path, policy_value: PolicyValue, optimizer, state: dict, accelerator) -> None:
    """checkpoint-N/: the policy adapter, value head, optimizer, loop state (`state`: update, beta, reward moments,
    history) and one RNG state per process. Written to a temp folder and renamed, so it is whole or absent."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(policy_value.model, POLICY, tmp / "adapter")
        save_value_head(policy_value.value_head, tmp / "value_head.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, policy_value: PolicyValue, optimizer, rank: int) -> dict:
    """Restore the weights, the optimizer and this process's RNG state; returns the saved loop state."""
    folder = Path(folder)
    load_adapter_weights(policy_value.model, POLICY, folder / "adapter")
    load_value_head(policy_value.value_head, folder / "value_head.safetensors")
    # weights_only: tensors and plain numbers, never a pickle that runs code (checkpoints may come from a shared folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    saved = json.loads((folder / "state.json").read_text())
    rng = folder / f"rng_state_{rank}.pt"
    if rng.exists():
        rng = torch.load(rng, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return saved


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (runs.last_checkpoint skips a broken newer one, saying so)."""
    found = runs.last_checkpoint(out)
    return Path(found) if found else None


def prune_checkpoints(folder: Path, keep: int, keep_update: int | None = None) -> None:
    """Keep the last `keep` checkpoints, and checkpoint-<keep_update> (the best so far when ppo.select_prompts)."""
    found = runs.checkpoints(folder)
    for old in [p for p in found[:-keep] if p.name != f"checkpoint-{keep_update}"]:
        shutil.rmtree(old, ignore_errors=True)
