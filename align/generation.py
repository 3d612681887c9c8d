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
                  cpu_bf16: bool = False, batch_tokens: int | None = None) -> tuple[list[str], dict]:
    """Answer each conversation; returns the texts and throughput stats (tokens/s). begin_suppress_tokens may
    not be the first generated token (how the policy would answer if it did not open with a refusal).
    cpu_bf16: generate under bf16 autocast on the CPU (see models.cpu_autocast). batch_tokens: at most this many
    padded prompt tokens per batch, so long prompts go in smaller batches (None: batch_size rows whatever their length)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    texts: list[str] = []
    new_tokens = 0
    started = time.time()
    try:
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        outputs: dict[int, str] = {}
        # sorted by the conversation's characters, as before batch_tokens existed: under bf16 autocast a prompt's
        # batch mates (its padding) can flip a greedy token, so the same order keeps the same answers
        chars = [len(str(c)) for c in conversations]
        for idx in tqdm(length_batches(lengths, batch_size, batch_tokens, chars), desc=desc, leave=False):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
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


def length_batches(lengths: list[int], batch_size: int, batch_tokens: int | None = None,
                   sort_keys: list[int] | None = None) -> list[list[int]]:
    """Indices in batches of similar length (shortest first by sort_keys, else by lengths; callers restore the
    order): at most batch_size rows, and at most batch_tokens padded tokens (rows x the longest row) where given.
    A left-padded batch costs its longest prompt in every row, so a few long prompts (attack templates) would
    otherwise set the cost of 64."""
    keys = lengths if sort_keys is None else sort_keys
    order = sorted(range(len(lengths)), key=lambda i: keys[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        longest = max([lengths[j] for j in current] + [lengths[i]]) if current else lengths[i]
        fits = current is not None and len(current) < batch_size and (
            batch_tokens is None or (len(current) + 1) * longest <= batch_tokens)
        if fits:
            current.append(i)
        else:
            batches.append([i])
    return batches
