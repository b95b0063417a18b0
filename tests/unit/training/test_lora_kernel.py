"""The fused LoRA node computes what PEFT's LoRA Linear computes (outputs, gradients, with and
without dropout), saves the same adapter, falls back to PEFT's forward wherever it does not apply,
and `lora.kernel: auto` resolves as documented."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft_scale.config import Config
from sft_scale.model_source import resolve_model_path
from sft_scale.training import lora_kernel
from sft_scale.training.lora_kernel import FusedLoraLinear, resolve_lora_kernel
from sft_scale.training.model import wrap_lora
from tests.helpers import section_config


def config(**lora) -> Config:
    return section_config("lora", **lora)


def lora_model(kernel: str, dropout: float = 0.0, checkpointing: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"),
                                                 dtype=torch.float32, attn_implementation="sdpa")
    if checkpointing:  # as load_model sets it up: the fused node is recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_lora(model, config(dropout=dropout), kernel=kernel)
    # B starts at zero, which would hide any error in the adapter's half of the node.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 300, (3, 17), generator=g)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, seed=3):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout, checkpointing", [(0.0, False), (0.1, False), (0.1, True)])
def test_fused_node_matches_peft_in_loss_and_every_gradient(dropout, checkpointing):
    fused = lora_model(lora_kernel.FUSED, dropout, checkpointing)
    plain = lora_model(lora_kernel.PEFT, dropout, checkpointing)
    n_fused = sum(isinstance(m, FusedLoraLinear) for m in fused.modules())
    assert n_fused > 0 and not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    loss_f, grads_f = loss_and_grads(fused)
    loss_p, grads_p = loss_and_grads(plain)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 2 * n_fused
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6)


def test_the_fused_node_runs_and_is_what_computes_the_adapted_layers(monkeypatch):
    calls = []
    apply = lora_kernel._LoraLinear.apply
    monkeypatch.setattr(lora_kernel._LoraLinear, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    model = lora_model(lora_kernel.FUSED)
    loss_and_grads(model)
    assert len(calls) == sum(isinstance(m, FusedLoraLinear) for m in model.modules())


def test_fused_model_saves_the_same_adapter_and_plain_peft_loads_it(tmp_path):
    fused, plain = lora_model(lora_kernel.FUSED), lora_model(lora_kernel.PEFT)
    fused.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    a = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "fused" / "adapter_config.json").read_text() == \
        (tmp_path / "plain" / "adapter_config.json").read_text()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"),
                                                dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "fused").eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, fused(**batch()).logits)


def test_calls_the_node_does_not_cover_run_peft_forward():
    fused, plain = lora_model(lora_kernel.FUSED), lora_model(lora_kernel.PEFT)
    fused.eval(), plain.eval()
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():  # base model only
            torch.testing.assert_close(fused(**batch()).logits, plain(**batch()).logits)
        # bf16 autocast: PEFT's own path, so the same numbers as PEFT under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fused(**batch()).logits, plain(**batch()).logits)
        fused.merge_adapter()  # merged weights: the base layer alone
        plain.merge_adapter()
        torch.testing.assert_close(fused(**batch()).logits, plain(**batch()).logits)


@pytest.mark.parametrize("change, zero, kernel, why", [
    ({}, None, "fused", "auto: frozen Linear"),
    ({}, 2, "fused", "auto: frozen Linear"),
    ({"lora.kernel": "peft"}, None, "peft", "set in the config"),
    ({"lora.enabled": False}, None, "peft", "no LoRA"),
    ({"quantization.load_in_4bit": True}, None, "peft", "bitsandbytes"),
    ({"quantization.load_in_8bit": True}, None, "peft", "bitsandbytes"),
    ({}, 3, "peft", "ZeRO-3"),
    ({"model.dtype": "bf16"}, None, "peft", "autocast"),
    ({"lora.bias": "all"}, None, "peft", "biases"),
])
def test_auto_resolves_to_fused_only_where_it_is_exact(change, zero, kernel, why):
    cfg = config()
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    got, reason = resolve_lora_kernel(cfg, zero)
    assert got == kernel and why in reason
