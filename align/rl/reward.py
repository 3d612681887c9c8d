"""The rm stage's reward model as a reward, on the policy's own base model (no second copy).

load_reward() loads the rm adapter into the policy's PeftModel as a frozen adapter "reward" and returns
the score head beside it; both PPO and GRPO use it:
  - PPO: rollout_reward() scores token-level rollouts (align/rl/rollout.py's Rollout);
  - GRPO: CompletionReward is a TRL reward function scoring prompt + completion texts.
RuleReward is PPO's optional behaviour term beside it: a judge's verdict against each prompt's expected
behaviour (rule-based rewards for safety, as in OpenAI's RBR and Llama 2's safety reward gating).

The rm stage trains AutoModelForSequenceClassification(num_labels=1) + LoRA (task SEQ_CLS) with TRL's
RewardTrainer on chat-templated conversations, pooled at the last token; peft saves the score head with
the adapter (modules_to_save) under a key ending in `score.weight`. The backbone's LoRA keys are the same
as a causal LM's, so the adapter loads into the policy's PeftModel, and a score is
score_head(last hidden state) with adapter "reward" active, read where the sequence-classification model
reads it: at the rightmost non-pad token.
"""

import json
import logging
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from align import AlignError
from align.evaluation.judges import REFUSED
from align.rl.policy import REWARD, last_hidden, use_adapter
from align.rl.rollout import Rollout, eos_ids, last_user

log = logging.getLogger(__name__)

# "base_model.model.score.weight" as peft saves it; "...score.modules_to_save.<name>.weight" in a live model
SCORE_KEY = re.compile(r"(?:^|\.)score(?:\.modules_to_save\.[^.]+)?\.(weight|bias)$")


def load_reward(model, rm_adapter: Path | str, adapter_name: str = REWARD) -> nn.Linear:
    """Load the rm stage's adapter into `model` (frozen, inactive) and return its score head (frozen)."""
    from safetensors.torch import load_file

    rm_adapter = Path(rm_adapter)
    weights = rm_adapter / "adapter_model.safetensors"
    if not (rm_adapter / "adapter_config.json").exists() or not weights.exists():
        raise AlignError(f"reward model: {rm_adapter} is not a PEFT adapter folder (needs adapter_config.json and "
                         f"adapter_model.safetensors); train the rm stage with peft=lora, qlora or dora")
    state = load_file(str(weights))
    head = {SCORE_KEY.search(k).group(1): v for k, v in state.items() if SCORE_KEY.search(k)}
    if "weight" not in head:
        raise AlignError(f"reward model: {weights} holds no score head (no key ending in score.weight); "
                         f"is it the rm stage's adapter?")
    if head["weight"].shape[0] != 1:
        raise AlignError(f"reward model: score head has {head['weight'].shape[0]} outputs, expected 1")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    result = model.load_adapter(str(rm_adapter), adapter_name=adapter_name, is_trainable=False)
    for p, flag in flags:  # loading must not change what trains
        p.requires_grad_(flag)
    other = [k for k in getattr(result, "unexpected_keys", []) if not SCORE_KEY.search(k)]
    if other:
        log.warning("reward adapter: %d unexpected keys, e.g. %s", len(other), other[0])
    emb = model.get_input_embeddings().weight
    score = nn.Linear(head["weight"].shape[1], 1, bias="bias" in head, dtype=torch.float32, device=emb.device)
    with torch.no_grad():
        score.weight.copy_(head["weight"])
        if "bias" in head:
            score.bias.copy_(head["bias"])
    score.requires_grad_(False)
    return score


def pool_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where a transformers *ForSequenceClassification model reads its score: the rightmost non-pad token
    (so with pad == EOS, as in SmolLM2, a trailing EOS is skipped exactly as in the rm stage's training)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


@torch.no_grad()
def reward_scores(model, score_head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  last_index: torch.Tensor, adapter_name: str = REWARD) -> torch.Tensor:
    """Scalar RM scores: score_head(hidden state at last_index) with the reward adapter active. Callers turn
    dropout off (policy.disable_dropout) rather than switching to eval mode, which on CPU makes bitsandbytes
    repack 4-bit weights for inference and breaks later QLoRA backward passes."""
    with use_adapter(model, adapter_name):
        hidden = last_hidden(model, input_ids, attention_mask)
    picked = hidden[torch.arange(len(input_ids), device=hidden.device), last_index]
    return score_head(picked.to(score_head.weight.dtype)).squeeze(-1).float()


def turn_end(tokenizer) -> list[int]:
    """The tokens that close an assistant turn in the chat template: its EOS and what follows it (e.g.
    <|im_end|> "\\n"). The reward model was trained on templated conversations, so rollouts are scored with them."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = set(eos_ids(tokenizer))
    last = max((i for i, t in enumerate(ids) if t in eos), default=None)
    return [] if last is None else ids[last:]


def rollout_reward(model, score_head: nn.Linear, tokenizer, adapter_name: str = REWARD
                   ) -> Callable[[Rollout], torch.Tensor]:
    """PPO's reward function: the RM score of prompt + response + the template's turn end, read at the last
    token. A response cut at max_new_tokens is closed too: the rm stage cut long answers to fit and closed
    the turn (rm.fit_pairs), and GRPO's chat-templated completions are closed the same way. Read mid-sentence,
    the score is out of the RM's distribution and PPO learns to exploit it (measured: it answered everything).
    ppo.missing_eos_penalty is the knob for answers that never end."""
    end = turn_end(tokenizer)

    def score(batch: Rollout) -> torch.Tensor:
        lengths = batch.response_mask.sum(-1).long().tolist()
        P, B = batch.query_ids.shape[1], len(lengths)
        width = P + batch.response_ids.shape[1] + len(end)
        ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long, device=batch.query_ids.device)
        mask = torch.zeros_like(ids)
        ids[:, :P], mask[:, :P] = batch.query_ids, batch.query_mask
        for i, n in enumerate(lengths):
            # with an EOS the response already holds it (truncate_after_eos keeps it)
            resp = batch.response_ids[i, :n].tolist() + (end[1:] if batch.has_eos[i] else end)
            ids[i, P:P + len(resp)] = torch.tensor(resp, device=ids.device)
            mask[i, P:P + len(resp)] = 1
        return reward_scores(model, score_head, ids, mask, pool_index(ids, tokenizer.pad_token_id), adapter_name)

    return score


class CompletionReward:
    """GRPO's reward function (TRL's interface): RM scores of prompt + completion, chat template applied
    exactly as in the rm stage's training text, read at the last token."""

    __name__ = "reward_model"  # TRL names the reward column after it

    def __init__(self, model, score_head: nn.Linear, tokenizer, adapter_name: str = REWARD, batch_size: int = 16):
        self.model, self.score_head, self.tokenizer = model, score_head, tokenizer
        self.adapter_name, self.batch_size = adapter_name, batch_size

    def texts(self, prompts: list, completions: list) -> list[str]:
        if prompts and isinstance(prompts[0], list):  # conversational
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions)
        device = self.model.get_input_embeddings().weight.device
        scores = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, padding_side="right",
                                 add_special_tokens=False, return_tensors="pt").to(device)
            last = pool_index(enc["input_ids"], self.tokenizer.pad_token_id)
            scores += reward_scores(self.model, self.score_head, enc["input_ids"], enc["attention_mask"], last,
                                    self.adapter_name).tolist()
        return scores


def prompt_key(messages: list) -> str:
    return json.dumps(messages, sort_keys=True)


class RuleReward:
    """+1 where `judge` finds the behaviour a prompt row expects (answer or refuse), -1 where not, 0 for prompts
    without an `expected`. Why: a reward model trained on the same prompts as the policy was no better than the
    policy at telling in-scope from off-scope (docs/benchmarks.md, round 6), and PPO drifted to answering."""

    def __init__(self, judge, rows: list):
        self.judge = judge
        # answer and refuse prompts weigh alike (a lighter rule on answer prompts over-refused in 2 of 4 seeds,
        # docs/benchmarks.md round 9)
        self.expected = {prompt_key(r["prompt"]): r["expected"] for r in rows
                         if r.get("expected") in ("answer", "refuse")}
        if not self.expected:
            raise AlignError("ppo.rule_weight > 0 needs prompt rows expecting answer or refuse (the "
                             "`expected` key); scope data (safety and scope_eval rows) gives them, plain prompt "
                             "rows do not: set ppo.rule_weight=0 to train on the reward model alone")

    def scores(self, prompts: list, texts: list) -> list[float]:
        """+1 where the verdict is the behaviour the prompt expects, -1 where not, 0 where no rule applies."""
        verdicts = self.judge.judge([last_user(p) for p in prompts], texts)
        out = []
        for prompt, verdict in zip(prompts, verdicts):
            want = self.expected.get(prompt_key(prompt))
            sign = 1.0 if (verdict == REFUSED) == (want == "refuse") else -1.0
            out.append(0.0 if want is None else sign)
        return out

    def __call__(self, batch: Rollout) -> torch.Tensor:
        return torch.tensor(self.scores(batch.prompts, batch.texts), device=batch.query_ids.device)
