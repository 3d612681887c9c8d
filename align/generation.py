"""Batched chat generation with left padding (eval, generate, on-policy negatives)."""

import time

import torch
from tqdm.auto import tqdm


def scope_conversations(system_prompt: str | None, prompts: list[str]) -> list[list[dict]]:
    """One single-turn conversation per prompt, under the scope's system prompt when there is one."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [system + [{"role": "user", "content": p}] for p in prompts]


@torch.no_grad()
def chat_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                  batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  desc: str = "generating", begin_suppress_tokens: list[int] | None = None,
                  cpu_bf16: bool = False) -> tuple[list[str], dict]:
    """Answer each conversation; returns the texts and throughput stats (tokens/s). begin_suppress_tokens may
    not be the first generated token (how the policy would answer if it did not open with a refusal).
    cpu_bf16: generate under bf16 autocast on the CPU (see models.cpu_autocast)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    texts: list[str] = []
    new_tokens = 0
    started = time.time()
    try:
        # similar lengths together waste less padding; the original order is restored below
        order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
        outputs: dict[int, str] = {}
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            prompts = [tokenizer.apply_chat_template(conversations[i], tokenize=False, add_generation_prompt=True)
                       for i in idx]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            if begin_suppress_tokens:
                kwargs.update(begin_suppress_tokens=list(begin_suppress_tokens))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
                out = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, out):
                keep = row[row != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else row
                new_tokens += int(keep.numel())
                outputs[i] = tokenizer.decode(keep, skip_special_tokens=True).strip()
        texts = [outputs[i] for i in range(len(conversations))]
    finally:
        tokenizer.padding_side = side
    seconds = time.time() - started
    return texts, {"generated_tokens": new_tokens, "seconds": round(seconds, 2),
                   "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1)}
