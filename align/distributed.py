"""accelerate's process state, in one place: which process this is and how many there are."""

import torch


def distributed_state():
    """accelerate's process state. On CPU it must be created with cpu=True, or under torchrun every
    process believes it is alone and trains on its own; the first call fixes it for the whole process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return distributed_state().is_main_process
