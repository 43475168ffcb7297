"""The LM head's loss a chunk of tokens at a time, on the labelled positions only.

With a 151,936-entry vocabulary the head's logits, their log-softmax and their gradient for every
token of a batch are the largest tensors of a training step (2,048 tokens: 1.16 GiB each in fp32).
trl's SFTTrainer already asks the model for a fused head (`model(..., fused_lm_head=True)`), but off
CUDA trl's head scores every position, prompt ones included, and folds fp32 tiles through several
full-size temporaries: on a CPU that made kftune's step slower than LLaMA-Factory's plain head.
This head gives the same outputs trl's `compute_loss` reads (per-token log-probabilities, entropy,
top-1, label mask) from a pure-torch autograd Function: per chunk of labelled tokens one matmul in
the compute precision, log-sum-exp in fp32; backward recomputes the chunk's logits instead of
keeping them. Peak extra memory: two chunk x vocabulary fp32 buffers (128 MiB each) and a bf16 one.

`KFTUNE_LEVERS_OFF=lm_head` keeps trl's head (the benchmarks measure each lever on its own).
"""

from __future__ import annotations

import types

import torch

from kftune.core.levers import lever_on

CHUNK_ELEMENTS = 2**25  # logits per chunk: 32M fp32 = 128 MiB


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedCrossEntropy(torch.autograd.Function):
    """log p(target) of `hidden @ weight.T` per row, plus entropy and top-1 (no gradient), in chunks of rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)  # one cast per step when the weight is fp32 under bf16 autocast (full fine-tuning)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty_like(lse)
        entropy = torch.empty_like(lse)
        top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = (hidden[s:e].to(dtype) @ w.t()).float()
            t = targets[s:e]
            target_logit[s:e] = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            top1[s:e] = logits.argmax(dim=-1) == t
            # log-sum-exp as torch computes it, with one more buffer than the logits: shifted = z - max in
            # place, x = exp(shifted); entropy = log sum x - sum(x * shifted) / sum x
            peak = logits.amax(dim=-1, keepdim=True)
            shifted = logits.sub_(peak)
            x = torch.exp(shifted)
            total = x.sum(dim=-1)
            log_total = total.log()
            lse[s:e] = peak.squeeze(1) + log_total
            entropy[s:e] = log_total - x.mul_(shifted).sum(dim=-1) / total
            del logits, shifted, x
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(entropy, top1)
        return target_logit - lse, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, targets, lse = ctx.saved_tensors
        if grad_logp is None:
            return None, None, None, None
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_logp = grad_logp.float()
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h = hidden[s:e].to(dtype)
            # d log p_t / d z = onehot(t) - softmax(z): the gradient overwrites the recomputed logits in place
            g = (h @ w.t()).float().sub_(lse[s:e].unsqueeze(1)).exp_()
            g[rows[: e - s], targets[s:e]] -= 1.0
            g.mul_(-grad_logp[s:e].unsqueeze(1))
            g = g.to(dtype)
            if need_hidden:
                grad_hidden[s:e] = (g @ w).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(g.t().float(), h.float())
            del g
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """(log p(target), entropy, top-1) for rows of `hidden` [N, H] against the head `weight` [V, H]."""
    return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk or chunk_rows(weight.shape[0]))


def applies(model) -> str | None:
    """Why this head can't stand in for the model's own, or None when it can."""
    head = model.get_output_embeddings()
    config = model.config
    if head is not None and head.weight.device.type != "cpu":
        return "off CPU trl's own fused head (Triton) already scores only the labelled positions"
    if head is None or getattr(head, "bias", None) is not None:
        return "the LM head is not a bias-free linear layer"
    if config.get_text_config() is not config:
        return "a multimodal model"
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key})"
    if getattr(config, "output_router_logits", False):
        return "an MoE model with a router loss"
    return None


def install(model) -> bool:
    """Replace the fused head trl patched onto `model` (the transformers model under any peft wrapper).

    Returns whether it was installed; the model's forward without `fused_lm_head` is untouched.
    """
    if not lever_on("lm_head") or applies(model) is not None:
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None:  # the model's own head, or trl's for pre-shifted labels
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            if fused_lm_head:
                extra["fused_lm_head"] = True
            return previous(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        logp, entropy, top1 = token_log_probs(hidden[mask], self.get_output_embeddings().weight, labels[mask])
        # masked_scatter keeps the outputs connected to the graph even when no position is labelled
        per_token = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, entropy, top1)]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token[0].sum() / count,
            log_probs=per_token[0],
            entropy=per_token[1],
            is_top1=per_token[2],
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
