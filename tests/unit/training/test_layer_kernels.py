"""`training.layer_kernels: fused`: the RMSNorm and rotary nodes compute transformers' values and
exact gradients (gradcheck in fp64), a model with them trains to the same loss and gradients as
transformers' layers for every test family, a family whose norm differs (Gemma-2) keeps its own,
calls the nodes do not cover run transformers' code, and the switch resolves as documented."""

import copy
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from sft_scale.config import Config, ConfigError
from sft_scale.training import layer_kernels
from sft_scale.training.layer_kernels import _RMSNorm, _Rotary, install, resolve_layer_kernels
from tests.families import FAMILIES, FAMILY
from tests.helpers import lora_for_gradient_checks, section_config

VOCAB = 300


@pytest.fixture(autouse=True)
def restore_rotary():
    """install() wraps modeling modules' apply_rotary_pos_emb process-wide: undo it after each
    test, so that every test starts from transformers' own."""
    saved = {name: mod.apply_rotary_pos_emb for name, mod in list(sys.modules.items())
             if name.startswith("transformers.models.")
             and callable(getattr(mod, "apply_rotary_pos_emb", None))}
    yield
    for name, fn in saved.items():
        sys.modules[name].apply_rotary_pos_emb = fn


def config(**training) -> Config:
    return section_config("training", **training)


def family_model(name: str):
    kw = dict(FAMILY[name].model_config)
    mc = AutoConfig.for_model(kw.pop("model_type"), vocab_size=VOCAB, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                              **kw)
    torch.manual_seed(0)
    attn = "eager" if name == "gemma2" else "sdpa"  # Gemma-2 soft-caps its logits: no SDPA
    model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, attn_implementation=attn)
    for n, p in model.named_parameters():  # norms start at 1 (or 0): make them tell apart
        if "norm" in n:
            torch.nn.init.normal_(p, mean=1.0 if p.mean() > 0.5 else 0.0, std=0.2)
    return model


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 13), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = model(**batch(), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


# --------------------------------------------------------------------------- the nodes


def test_rms_norm_matches_transformers_and_gradchecks():
    norm = modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    g = torch.randn(2, 5, 16)
    theirs = norm(x)
    dx_t, dw_t = torch.autograd.grad(theirs, [x, norm.weight], g)
    ours = _RMSNorm.apply(x, norm.weight, 1e-5)
    dx_o, dw_o = torch.autograd.grad(ours, [x, norm.weight], g)
    for t, o in ((theirs, ours), (dx_t, dx_o), (dw_t, dw_o)):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)
    xd = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (xd, wd))


def test_rotary_matches_transformers_on_transposed_heads_and_gradchecks():
    # q/k as attention makes them: [batch, seq, heads, dim] projections viewed [b, heads, s, d]
    q = torch.randn(2, 7, 4, 8).transpose(1, 2).requires_grad_(True)
    k = torch.randn(2, 7, 2, 8).transpose(1, 2).requires_grad_(True)
    angles = torch.rand(2, 7, 4) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    gq, gk = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    t_grads = torch.autograd.grad(theirs, [q, k], [gq, gk])
    fused = layer_kernels._fused_rotary(modeling_llama.apply_rotary_pos_emb)
    ours = fused(q, k, cos, sin)
    o_grads = torch.autograd.grad(ours, [q, k], [gq, gk])
    for t, o in zip((*theirs, *t_grads), (*ours, *o_grads), strict=True):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)
    xd = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    ad = torch.rand(1, 1, 5, 3, dtype=torch.float64) * 6
    c, s = torch.cat([ad, ad], -1).cos(), torch.cat([ad, ad], -1).sin()
    assert torch.autograd.gradcheck(lambda a: _Rotary.apply(a, c, s), (xd,))


def test_uncovered_calls_run_transformers_code():
    norm = modeling_llama.LlamaRMSNorm(16).to(torch.bfloat16)
    install(torch.nn.ModuleDict({"norm": norm}))
    assert layer_kernels._is_fused(norm)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), modeling_llama.LlamaRMSNorm.forward(norm, x))

    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return q, k

    fused = layer_kernels._fused_rotary(original)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    half = torch.rand(1, 5, 2)  # a partial rotary dimension (4 of 8): transformers' code
    fused(q, k, torch.cat([half, half], -1).cos(), torch.cat([half, half], -1).sin())
    fused(q.double(), k.double(), torch.ones(1, 5, 8).double(), torch.zeros(1, 5, 8).double())
    assert len(calls) == 2
    fused(q, k, torch.ones(1, 5, 8), torch.zeros(1, 5, 8))
    assert len(calls) == 2


def test_deep_copy_of_a_fused_norm_uses_its_own_weight():
    norm = modeling_llama.LlamaRMSNorm(8)
    install(torch.nn.ModuleDict({"norm": norm}))
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        twin.weight.mul_(3.0)
    x = torch.randn(2, 8)
    torch.testing.assert_close(twin(x), 3.0 * norm(x))
    assert layer_kernels._is_fused(twin)


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_family_trains_to_transformers_loss_and_gradients(family, lora):
    model = family_model(family)
    if lora:
        model = lora_for_gradient_checks(model)
    fused = copy.deepcopy(model)
    loss_t, grads_t = loss_and_grads(model)  # before install: transformers' rotary
    report = install(fused.get_base_model() if lora else fused)
    loss_o, grads_o = loss_and_grads(fused)

    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_o.keys() == grads_t.keys() and grads_t
    for n in grads_t:
        torch.testing.assert_close(grads_o[n], grads_t[n], rtol=1e-4, atol=1e-6, msg=n)
    base = fused.get_base_model() if lora else fused
    norms = [m for m in base.modules() if layer_kernels._is_rms_norm(m)]
    if family == "gemma2":  # x * (1 + w): not transformers' Llama norm, so kept
        assert report["norms"] == 0 and not any(map(layer_kernels._is_fused, norms))
        assert "Gemma2RMSNorm" in report["kept"]
    else:
        assert report["norms"] == len(norms) > 0
        assert all(map(layer_kernels._is_fused, norms))
    assert report["rotary"] == [type(base).__module__]


def test_a_later_transformers_run_gets_transformers_rotary_back():
    """The rotary wrap is process-wide: load_model with layer_kernels: transformers, after a
    fused run in the same process, computes transformers' own rotary again."""
    original = modeling_llama.apply_rotary_pos_emb
    install(family_model("llama"))
    assert modeling_llama.apply_rotary_pos_emb is not original
    assert layer_kernels.restore_rotary(family_model("llama")) == [modeling_llama.__name__]
    assert modeling_llama.apply_rotary_pos_emb is original
    assert layer_kernels.restore_rotary(family_model("llama")) == []


def test_install_twice_changes_nothing():
    model = family_model("llama")
    first = install(model)
    wrapped = modeling_llama.apply_rotary_pos_emb
    second = install(model)
    assert first == second and modeling_llama.apply_rotary_pos_emb is wrapped


# --------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("setting, dtype, compile_, zero, expect", [
    ("auto", "fp32", False, None, "fused"),
    ("fused", "fp32", False, 2, "fused"),
    ("auto", "bf16", False, None, "transformers"),
    ("auto", "fp32", True, None, "transformers"),
    ("auto", "fp32", False, 3, "transformers"),
    ("transformers", "fp32", False, None, "transformers"),
])
def test_resolve(setting, dtype, compile_, zero, expect):
    cfg = config(layer_kernels=setting, torch_compile=compile_)
    cfg.model.dtype = dtype
    kernel, why = resolve_layer_kernels(cfg, zero)
    assert kernel == expect and why


@pytest.mark.parametrize("dtype, compile_, zero", [("bf16", False, None), ("fp32", True, None),
                                                  ("fp32", False, 3)])
def test_fused_where_it_cannot_run_is_a_config_error_naming_the_key(dtype, compile_, zero):
    cfg = config(layer_kernels="fused", torch_compile=compile_)
    cfg.model.dtype = dtype
    with pytest.raises(ConfigError, match="training.layer_kernels: fused"):
        resolve_layer_kernels(cfg, zero)


def test_load_model_fuses_under_auto_and_restores_under_transformers(tmp_path):
    """Through the training entry's own loader, two runs in one process (as the benchmark's
    grouped switches run): auto fuses norms and rotary; transformers then gets its own back."""
    from sft_scale.config import load_config
    from sft_scale.preflight.resolve import in_job_layout, resolve
    from sft_scale.training.model import load_model

    def load(setting):
        (tmp_path / f"{setting}.yaml").write_text(
            "model:\n  name_or_path: builtin:tiny-llama\ndata:\n  train_files: [x.jsonl]\n"
            f"  max_seq_len: 64\ntraining:\n  layer_kernels: {setting}\n")
        cfg = load_config(tmp_path / f"{setting}.yaml")
        resolved = resolve(cfg, in_job_layout(cfg))
        return resolved.fast.layer_kernels, load_model(cfg, resolved)

    original = modeling_llama.apply_rotary_pos_emb
    kernel, fused = load("auto")
    norms = [m for m in fused.modules() if layer_kernels._is_rms_norm(m)]
    assert kernel == "fused" and norms and all(map(layer_kernels._is_fused, norms))
    assert modeling_llama.apply_rotary_pos_emb is not original
    kernel, plain = load("transformers")
    norms = [m for m in plain.modules() if layer_kernels._is_rms_norm(m)]
    assert kernel == "transformers" and norms and not any(map(layer_kernels._is_fused, norms))
    assert modeling_llama.apply_rotary_pos_emb is original
