"""The chunked LM-head loss computes what the plain head computes: loss, entropy, top-1 and gradients.

Tolerances are derived, not picked: each path is compared with a float64 reference computed from the
same (already rounded) inputs, and the chunked path must be within the plain path's own error plus a
few units of rounding of the compute precision at the logits' scale (u = 2^-24 for fp32, 2^-8 for bf16:
chunking only regroups rows, and a bf16 logit or gradient may round one unit differently).
"""

from __future__ import annotations

import pytest
import torch

from kftune.train.lm_head_loss import install, token_log_probs

UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def reference(hidden, weight, targets):
    z = hidden.double() @ weight.double().t()
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1), z


def plain(hidden, weight, targets):
    """What the model's own head does: full logits in the compute precision, then an fp32 log-softmax."""
    z = (hidden @ weight.t()).float()
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_matches_the_plain_head_in_value_and_gradient(dtype, chunk):
    torch.manual_seed(0)
    n, h, v = 50, 32, 1000
    hidden0 = (torch.randn(n, h) * 2).to(dtype)
    weight0 = (torch.randn(v, h) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,))
    grad_out = torch.rand(n)  # the loss weights each token differently (e.g. 1 / num_items)

    def run(fn):
        hid, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        out = fn(hid, w)
        (-(out[0] * grad_out).sum()).backward()
        return [x.detach().double() for x in out[:2]], hid.grad.double(), w.grad.double()

    (c_logp, c_ent), c_gh, c_gw = run(lambda a, b: token_log_probs(a, b, targets, chunk))
    (p_logp, p_ent), p_gh, p_gw = run(lambda a, b: plain(a, b, targets))
    # float64 reference and its gradients, from the same rounded inputs
    hid, w = hidden0.double().requires_grad_(), weight0.double().requires_grad_()
    r_logp, r_ent, z = reference(hid, w, targets)
    (-(r_logp * grad_out.double()).sum()).backward()
    scale = float(z.detach().abs().max())
    u = UNIT[dtype]
    for name, mine, theirs, ref in (
        ("log p", c_logp, p_logp, r_logp.detach()),
        ("entropy", c_ent, p_ent, r_ent.detach()),
        ("d hidden", c_gh, p_gh, hid.grad),
        ("d weight", c_gw, p_gw, w.grad),
    ):
        size = float(ref.abs().max())
        bound = float((theirs - ref).abs().max()) + 8 * u * max(scale, size)
        err = float((mine - ref).abs().max())
        assert err <= bound, f"{dtype} chunk {chunk} {name}: error {err:.3g} > {bound:.3g} (plain path's error + 8u)"
    # the top-1 flag is the argmax of the same logits
    _, _, top1 = token_log_probs(hidden0, weight0, targets, chunk)
    assert torch.equal(top1, (hidden0 @ weight0.t()).float().argmax(-1) == targets)


def test_under_autocast_the_matmul_runs_in_bf16_and_fp32_weights_get_fp32_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)  # full fine-tuning: fp32 master weights
    targets = torch.randint(0, 300, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _, _ = token_log_probs(hidden, weight, targets, 6)
        expected = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)
    assert logp.dtype == torch.float32 and torch.allclose(
        logp, expected, atol=8 * 2.0**-8 * float(expected.abs().max())
    )
    logp.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_installed_in_a_model_it_gives_the_models_own_loss_and_lora_gradients(tiny_model, precision):
    """Through a real tiny Qwen2 + LoRA: trl's fused-head call with this head vs the model's own loss (labels)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    base = model.get_base_model()
    assert install(base)
    ids = torch.randint(0, 1000, (2, 40))
    labels = ids.clone()
    labels[:, :15] = -100  # prompt positions carry no loss

    def loss_and_grads(**kwargs):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, **kwargs)
        out.loss.backward()
        return out.loss.detach().double(), {
            n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    mine, mine_g = loss_and_grads(fused_lm_head=True)
    own, own_g = loss_and_grads()  # transformers' own cross-entropy over the full logits
    u = UNIT[dtype]
    # bf16: the logits round to bf16 in both paths; the mean loss agrees to a few units at its scale
    assert abs(float(mine - own)) <= 8 * u * float(own), (float(mine), float(own))
    for name, g in own_g.items():
        err = float((mine_g[name] - g).abs().max())
        assert err <= 16 * u * float(g.abs().max()) + 1e-12, f"{precision} {name}: max diff {err:.3g}"
    # without fused_lm_head the forward is the model's own (generation, evaluation)
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 40, model.config.vocab_size)
