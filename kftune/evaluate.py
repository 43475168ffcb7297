"""Eval loss and perplexity on assistant tokens only, scored the way training scored them.

Training (trl, `assistant_only_loss=True`) learns only the assistant's tokens of a chat rendered
with a template that marks them with `{% generation %}`; scoring every token would mix in the
prompt, which neither model was asked to predict. So the same template and mask are used here,
and the loss is a token-weighted mean over the whole split (perplexity is its exponential).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kftune.data import Message
from kftune.errors import KftuneError


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean cross-entropy per assistant token, in nats
    perplexity: float
    tokens: int  # assistant tokens scored
    rows: int


def training_chat_template(tokenizer) -> str | None:
    """The template trl trains with: the tokenizer's own when it marks assistant turns, else trl's patched one."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template:
        raise KftuneError("the tokenizer has no chat template; evaluate an instruct/chat model")
    if has_generation_markers(tokenizer.chat_template):
        return None  # None: apply_chat_template uses the tokenizer's own
    try:
        return get_training_chat_template(tokenizer)
    except ValueError as exc:
        raise KftuneError(f"cannot mask assistant tokens with this tokenizer's chat template ({exc})") from None


def encode(tokenizer, conversations: list[list[Message]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, assistant mask) per conversation, cut to `max_length` from the start as trl does."""
    template = training_chat_template(tokenizer)
    encoded = []
    for messages in conversations:
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        encoded.append((list(out["input_ids"])[:max_length], list(out["assistant_masks"])[:max_length]))
    return encoded


def assistant_loss(model, tokenizer, conversations: list[list[Message]], max_length: int = 512, batch_size: int = 8) -> LossResult:
    """Mean next-token loss over the assistant tokens of `conversations`."""
    import torch

    encoded = encode(tokenizer, conversations, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (seq, mask) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            labels[row, : len(seq)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(seq), -100)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        target = labels[:, 1:].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
        tokens += int((target != -100).sum())
    if tokens == 0:
        raise KftuneError("the eval split has no assistant tokens to score (all truncated away?); raise max_seq_length")
    loss = total / tokens
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, rows=len(encoded))
