"""Fast paths: the chunked loss and the packed-row SDPA equal the plain paths (loss and gradients),
`auto` resolves as documented, impossible switches fail early, and DataLoader workers give every
rank the same batches as inline collation."""

import copy
import time

import pytest
import torch

from sft_scale.config import Config, ConfigError, DatasetSource
from sft_scale.data import GlobalBatchSampler, collate, collate_packed
from sft_scale.data.loader import step_loader
from sft_scale.data.tokenize import IGNORE_INDEX
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import resolve_fast_paths
from sft_scale.training import lora_kernel
from sft_scale.training.attention import PACKED_SDPA, packed_forward, register_packed_sdpa
from sft_scale.training.loss import causal_lm_parts, plain_linear, resolve_loss
from sft_scale.training.tasks import causal_lm


def tiny(attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"),
                                                dtype=torch.float32, attn_implementation=attn)


def examples(n=5, seed=0):
    """Random token rows of different lengths, each with a trained answer at the end."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        cut = length // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


def cfg_with(**sections) -> Config:
    cfg = Config()
    cfg.data.datasets = [DatasetSource(path="x.jsonl")]
    for section, values in sections.items():
        if not isinstance(values, dict):
            setattr(cfg, section, values)
            continue
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def loss_and_grads(model, batch, kind, n_items):
    model.zero_grad(set_to_none=True)
    loss = causal_lm(packing="position_ids" in batch, loss=kind).loss(model, batch, n_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def wrap(model, how):
    from peft import LoraConfig, get_peft_model

    if how == "full":
        return model
    if how == "lora_gc":  # as load_model sets up gradient checkpointing with LoRA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw = {"lora": dict(target_modules="all-linear"), "lora_gc": dict(target_modules="all-linear"),
          "lora_fused": dict(target_modules="all-linear"),
          "lora_head_saved": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
          "lora_on_head": dict(target_modules=["q_proj", "v_proj", "lm_head"])}[how]
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, **kw)
    if how == "lora_fused":  # lora.kernel: auto on an fp32 model
        lora_kernel.register(peft_config)
    model = get_peft_model(model, peft_config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("how", ["full", "lora", "lora_gc", "lora_head_saved", "lora_on_head"])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_and_grads_equal_standard(how, packed):
    model = wrap(tiny(), how)
    model.train()
    batch = (collate_packed if packed else collate)(examples(), 0)
    n_items = 57  # the global batch's trained tokens: normalisation is by this, not the batch's
    ref_loss, ref = loss_and_grads(model, batch, "standard", n_items)
    got_loss, got = loss_and_grads(model, batch, "chunked", n_items)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == ref.keys() and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    # the head the chunked path used is the one the model uses
    _, head = causal_lm_parts(model)
    if how == "lora_on_head":
        assert plain_linear(head) is None  # LoRA-wrapped head: the checkpointed path
    else:
        assert plain_linear(head) is not None


def test_chunked_in_several_chunks_and_eval_sum():
    from sft_scale.training import loss as L

    model = tiny()
    batch = collate(examples(8), 0)
    ref_loss, ref = loss_and_grads(model, batch, "standard", 10)
    old = L.CHUNK_ELEMENTS
    L.CHUNK_ELEMENTS = 7 * model.config.vocab_size  # 7 rows per chunk
    try:
        got_loss, got = loss_and_grads(model, batch, "chunked", 10)
        with torch.no_grad():
            summed, n, _, _ = causal_lm(False, "chunked").outputs(model, batch)
    finally:
        L.CHUNK_ELEMENTS = old
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed / 10, ref_loss, atol=1e-5, rtol=1e-5)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_packed_sdpa_equals_sdpa_and_each_example_alone():
    register_packed_sdpa()
    exs = examples(6, seed=1)
    batch = collate_packed(exs)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    assert batch["max_length_q"] == max(len(e["input_ids"]) for e in exs)
    results = {}
    for impl in ("sdpa", PACKED_SDPA):
        model = wrap(tiny(impl), "lora")
        results[impl] = loss_and_grads(model, batch, "standard", 40)
        with torch.no_grad(), packed_forward(batch):
            results[impl + "_logits"] = model(**{k: v for k, v in batch.items()
                                                 if k != "labels"}).logits[0]
    torch.testing.assert_close(results[PACKED_SDPA][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, g in results["sdpa"][1].items():
        torch.testing.assert_close(results[PACKED_SDPA][1][name], g, atol=1e-5, rtol=1e-5)
    # and each example's logits equal the example alone (no attention across examples)
    model = wrap(tiny(PACKED_SDPA), "lora")
    start = 0
    for e in exs:
        n = len(e["input_ids"])
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        torch.testing.assert_close(results[PACKED_SDPA + "_logits"][start:start + n], alone,
                                   atol=1e-5, rtol=1e-5)
        start += n


def test_both_packed_sdpa_layouts_agree_in_outputs_and_gradients():
    """The CPU layout (a causal SDPA per example slice) and the GPU one (one batched call over
    examples padded to the longest) are the same attention; the GPU one runs here on CPU
    tensors, its index ops being device-agnostic."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import sft_scale.training.attention as A

    module = type("Attn", (), {"is_causal": True, "num_key_value_groups": 2, "training": True})()
    lengths = [5, 17, 1, 9]
    cu = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 32, 8, generator=g, requires_grad=True)
    kv = [torch.randn(1, 2, 32, 8, generator=g, requires_grad=True) for _ in range(2)]
    results = []
    for layout in (A._sdpa_each_example, A._sdpa_padded_examples):
        extra = {} if layout is A._sdpa_each_example else {"max_length_q": max(lengths)}
        out, _ = layout(sdpa_attention_forward, module, q, *kv, cu, **extra)
        assert out.shape == (1, 32, 4, 8)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(),
                                    [q, *kv])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_sdpa_model_still_masks_padded_batches():
    """The same model (loaded with the packed-row SDPA) on padded batches: ordinary SDPA."""
    register_packed_sdpa()
    batch = collate(examples(4), 0)
    a, b = tiny("sdpa"), tiny(PACKED_SDPA)
    with torch.no_grad():
        la = a(**batch).logits
        lb = b(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(lb[mask], la[mask], atol=1e-5, rtol=1e-5)


def test_auto_resolution_on_this_machine(monkeypatch):
    import sft_scale.training.attention as A
    from sft_scale import optional

    cfg = cfg_with()
    fast = resolve_fast_paths(cfg)
    assert cfg.model.attn_implementation == "auto" and cfg.training.loss == "auto"
    if not torch.cuda.is_available():
        assert fast.as_dict()["attn_implementation"] == "sdpa"
        assert fast.as_dict()["loss"] == "chunked" and fast.as_dict()["pin_memory"] is False
    assert resolve_fast_paths(cfg_with(data={"packing": True})).as_dict()["attention_kernel"] == \
        "sdpa per packed example"
    # auto picks flash-attention only with the package, CUDA and half precision
    monkeypatch.setattr(optional, "is_available", lambda name: name == "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert A.resolve_attn_implementation(cfg_with(model={"dtype": "bf16"})) == "flash_attention_2"
    assert A.resolve_attn_implementation(cfg_with(model={"dtype": "fp32"})) == "sdpa"
    # auto loss: liger with liger-kernel on CUDA; standard under ZeRO-3 and for post-processed
    # logits
    monkeypatch.setattr(optional, "is_available", lambda name: name == "liger_kernel")
    assert resolve_loss(cfg)[0] == "liger"
    assert resolve_loss(cfg, zero_stage=3)[0] == "standard"
    softcapped = type("C", (), {"final_logit_softcapping": 30.0})()
    monkeypatch.setattr(optional, "is_available", lambda name: False)
    assert resolve_loss(cfg, softcapped)[0] == "standard"
    assert resolve_loss(cfg_with(task="classification"))[0] == "standard"


def test_packing_auto_is_on_only_where_examples_stay_apart_and_attention_is_per_example():
    from transformers import BloomConfig, LlamaConfig

    llama, bloom = LlamaConfig(), BloomConfig()  # bloom's attention takes no example boundaries
    cfg = cfg_with()
    assert cfg.data.packing == "auto"
    fast = resolve_fast_paths(cfg, None, llama)
    # settled on the resolved record, which the sampler, collation and attention all read; the
    # config keeps what its user wrote
    assert fast.packing is True and cfg.data.packing == "auto"
    assert fast.as_dict()["attention_kernel"] == "sdpa per packed example"
    assert resolve_fast_paths(cfg_with(model={"attn_implementation": "eager"}), None,
                              llama).packing is False  # eager would score the whole row
    assert resolve_fast_paths(cfg_with(), None, bloom).packing is False
    assert resolve_fast_paths(cfg_with(), None, None).packing is False  # unknown model
    assert resolve_fast_paths(cfg_with(task="classification"), None, llama).packing is False
    assert resolve_fast_paths(cfg_with(data={"packing": False}), None, llama).packing is False
    # explicit true is kept for eager, and refused where examples would attend to each other
    assert resolve_fast_paths(cfg_with(data={"packing": True},
                                       model={"attn_implementation": "eager"}), None,
                              llama).packing is True
    with pytest.raises(ConfigError, match="data.packing: true.*'bloom'.*data.packing: false"):
        resolve_fast_paths(cfg_with(data={"packing": True}), None, bloom)


def test_impossible_switches_fail_early_naming_the_key(monkeypatch):
    from sft_scale import optional

    monkeypatch.setattr(optional, "is_available", lambda name: False)
    with pytest.raises(ConfigError,
                       match="model.attn_implementation: flash_attention_2.*flash_attn"):
        resolve_fast_paths(cfg_with(model={"attn_implementation": "flash_attention_2",
                                           "dtype": "bf16"}))
    with pytest.raises(ConfigError, match="training.loss: liger.*liger-kernel"):
        resolve_fast_paths(cfg_with(training={"loss": "liger"}))
    monkeypatch.setattr(optional, "is_available", lambda name: name == "liger_kernel")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="training.loss: liger.*CUDA"):
        resolve_fast_paths(cfg_with(training={"loss": "liger"}))
    with pytest.raises(ConfigError, match="training.loss: chunked.*ZeRO-3"):
        resolve_fast_paths(cfg_with(training={"loss": "chunked"}), zero_stage=3)
    with pytest.raises(ConfigError, match="data.num_workers"):
        resolve_fast_paths(cfg_with(data={"num_workers": -1}))


def _batches(loader):
    return [(it["step"], [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()}
                          for b in it["micro"]], it["counts"].tolist()) for it in loader]


@pytest.mark.parametrize("packing", [False, True])
def test_workers_give_each_rank_the_same_batches(packing):
    import datasets

    rows = [dict(e, length=len(e["input_ids"])) for e in examples(40, seed=2)]
    ds = datasets.Dataset.from_list(rows)
    task = causal_lm(packing)
    for rank in (0, 1):
        sampler = GlobalBatchSampler(len(ds), micro=3, accum=2, world=2, rank=rank, seed=5,
                                     lengths=None if packing else [r["length"] for r in rows])
        args = (ds, sampler, task.collate, task.count, 0)
        inline = _batches(step_loader(*args, start=2, stop=12, num_workers=0))
        torch.manual_seed(0)
        expected_rng = torch.rand(3)
        torch.manual_seed(0)
        workers = _batches(step_loader(*args, start=2, stop=12, num_workers=2))
        assert workers == inline
        # workers leave the global RNG (dropout, resume) untouched
        assert torch.equal(torch.rand(3), expected_rng)
        assert [s for s, _, _ in inline] == list(range(2, 12))
        # and they are the sampler's examples for this rank, collated as the loop always did
        for step, micro, _ in inline[:3]:
            for idx, got in zip(sampler.micro_batches(step), micro, strict=True):
                want = task.collate([ds[i] for i in idx], 0)
                assert got == {k: (v.tolist() if torch.is_tensor(v) else v)
                               for k, v in want.items()}


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["lora", "lora_fused"])
def test_torch_compile_trains_two_steps(tmp_path, lora):
    from sft_scale.training.model import compile_model

    model = wrap(tiny(), lora)
    eager = copy.deepcopy(model)
    n = compile_model(model)
    assert n == model.base_model.model.config.num_hidden_layers
    # parameter names (state dicts, checkpoints, adapters) are unchanged by compiling in place
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in eager.named_parameters()]
    batch = collate(examples(4), 0)
    task = causal_lm(False, "chunked")
    losses = {}
    t = time.time()
    for name, m in (("compiled", model), ("eager", eager)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(2):
            loss = task.loss(m, batch, 30)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["compiled"][1] < losses["compiled"][0]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)
    print(f"compiled 2 steps + eager 2 steps in {time.time() - t:.1f}s")
