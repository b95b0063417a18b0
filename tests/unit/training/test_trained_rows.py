"""`training.trim_last_layer`: the last decoder layer computed at trained positions only gives the
same loss and the same gradient for every trainable parameter as the full layer, for each
supported family, packed and padded, with and without gradient checkpointing; it really computes
fewer rows; it does nothing outside the loss's forward; and it resolves as documented."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sft_scale.config import Config
from sft_scale.preflight.resolve import resolve_trim_last_layer
from sft_scale.training import attention, trained_rows
from sft_scale.training.loss import summed_loss
from tests.families import FAMILY
from tests.helpers import lora_for_gradient_checks, section_config

VOCAB = 300


def config(**training) -> Config:
    return section_config("training", **training)


def tiny(model_type: str, **extra):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0)
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def family_config(name: str):
    kw = dict(FAMILY[name].model_config)
    return tiny(kw.pop("model_type"), **kw)


def lora_pair(mc, attn: str, checkpointing: bool = False):
    """(full, trimmed): the same LoRA model twice, the second with the last layer hooked."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, attn_implementation=attn)
    if checkpointing:  # as load_model sets it up when trimming
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": trained_rows.recompute_context})
    model = lora_for_gradient_checks(model)  # no dropout: it would draw other masks for fewer rows
    trimmed = copy.deepcopy(model)
    names, _ = trained_rows.install(trimmed.get_base_model())
    return model, trimmed, names


def padded_batch(prompts=(5, 9, 3), lengths=(14, 20, 11)):
    g = torch.Generator().manual_seed(2)
    S = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), S), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(prompts=(5, 9, 3), lengths=(14, 20, 11)):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=g)
    labels = torch.full_like(ids, -100)
    pos, cu = [], [0]
    for p, n in zip(prompts, lengths, strict=True):
        labels[0, cu[-1] + p:cu[-1] + n] = ids[0, cu[-1] + p:cu[-1] + n]
        pos += range(n)
        cu.append(cu[-1] + n)
    cu = torch.tensor(cu, dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([pos]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths),
            "max_length_k": max(lengths)}


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    with attention.packed_forward(batch):
        loss = summed_loss(model, batch, "chunked")
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def rows_seen(module):
    """The rows each call of `module` computes, recorded after the trimming pre-hook."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
    return seen


def assert_same(full, trimmed, batch):
    loss_f, grads_f = loss_and_grads(full, batch)
    loss_t, grads_t = loss_and_grads(trimmed, batch)
    torch.testing.assert_close(loss_t, loss_f, rtol=1e-5, atol=1e-5)
    assert grads_t.keys() == grads_f.keys() and grads_f
    for name, g in grads_f.items():
        assert grads_t[name] is not None, name
        torch.testing.assert_close(grads_t[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_predicting_rows_are_the_positions_before_each_trained_token():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, -100, -100, 5]])
    assert trained_rows.predicting_rows(labels).tolist() == [1, 2, 5, 8]
    assert trained_rows.predicting_rows(torch.full((2, 3), -100)).numel() == 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "phi3", "qwen3"])
def test_trimmed_layer_gives_the_same_loss_and_gradients_padded(family):
    mc = tiny("qwen3", head_dim=8) if family == "qwen3" else family_config(family)
    attn = "eager" if family == "gemma2" else "sdpa"  # Gemma-2's soft-capping: eager attention
    full, trimmed, names = lora_pair(mc, attn)
    last = mc.num_hidden_layers - 1
    expected = {f"layers.{last}.self_attn.o_proj", f"layers.{last}.mlp"}
    if family != "phi3":  # Phi-3 projects q, k and v in one fused qkv_proj: it keeps every row
        expected.add(f"layers.{last}.self_attn.q_proj")
    assert set(names) == expected
    batch = padded_batch()
    seen = rows_seen(trimmed.get_base_model().get_decoder().layers[last].mlp)
    assert_same(full, trimmed, batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [trained] and trained < batch["input_ids"].numel() / 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trimmed_layer_gives_the_same_loss_and_gradients_packed(checkpointing):
    attention.register_packed_sdpa()
    full, trimmed, _ = lora_pair(family_config("llama"), attention.PACKED_SDPA, checkpointing)
    batch = packed_batch()
    seen = rows_seen(trimmed.get_base_model().get_decoder().layers[-1].mlp)
    assert_same(full, trimmed, batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    # recomputed once more in backward under checkpointing, at the same rows
    assert seen == [trained] * (2 if checkpointing else 1)


def test_a_micro_batch_without_trained_tokens_trains_nothing_and_does_not_fail():
    full, trimmed, _ = lora_pair(family_config("llama"), "sdpa")
    batch = padded_batch()
    batch["labels"][:] = -100
    loss, grads = loss_and_grads(trimmed, batch)
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grads.values())


def test_outside_the_loss_the_hooked_layer_computes_every_position():
    full, trimmed, _ = lora_pair(family_config("llama"), "sdpa")
    batch = padded_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(trimmed(**inputs).logits, full(**inputs).logits)


def test_mixture_of_experts_blocks_keep_every_row():
    mc = tiny("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=16)
    model = AutoModelForCausalLM.from_config(mc)
    names, _ = trained_rows.trimmable_modules(model)
    assert sorted(names) == ["layers.1.self_attn.o_proj", "layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("overrides, loss, on, why", [
    ({}, "chunked", True, "the chunked loss reads the trained positions only"),
    ({}, "liger", True, "the liger loss reads the trained positions only"),
    ({}, "standard", False, "the standard loss reads every position's logits"),
    ({"torch_compile": True}, "chunked", False, "torch_compile"),
    ({"trim_last_layer": False}, "chunked", False, "set in the config"),
])
def test_trim_last_layer_resolves_as_documented(overrides, loss, on, why):
    got, reason = resolve_trim_last_layer(config(**overrides), loss)
    assert got is on and why in reason
