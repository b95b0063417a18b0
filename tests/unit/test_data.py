import json

import pytest
from transformers import AutoTokenizer

from sft_scale.builtin import resolve_model_path
from sft_scale.data import DataError, GlobalBatchSampler, collate, read_records
from sft_scale.data.tokenize import IGNORE_INDEX, encode_prompt_answer, tokenize_dataset


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def trained_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("prompt, answer", [
    ("Review: the soup was awful\nSentiment:", " negative"),
    ("Translate to French: cheese", " fromage, s'il vous plait"),
    ("Q: 2+2?\nA:", "4"),
])
def test_loss_only_on_answer_and_eos(tok, prompt, answer):
    enc = encode_prompt_answer(tok, prompt, answer, max_seq_len=128)
    assert trained_text(tok, enc) == answer + tok.eos_token
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert enc["input_ids"][0] == tok.bos_token_id
    untrained = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE_INDEX]
    assert tok.decode(untrained) == tok.bos_token + prompt
    # labels equal the input ids wherever they are trained
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(enc["input_ids"], enc["labels"]))


def test_truncation_that_removes_the_answer_drops_the_example(tok):
    recs = [{"prompt": "word " * 50, "answer": " yes", "source": "x:1"},
            {"prompt": "short", "answer": " yes", "source": "x:2"}]
    ds, dropped = tokenize_dataset(recs, tok, max_seq_len=16)
    assert dropped == 1 and len(ds) == 1
    assert ds[0]["source"] == "x:2"


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_records([str(p)], ("prompt", "answer"))
    p.write_text('{"prompt": "a", "answer": "b"}\n\n{"question": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: record lacks string field\(s\) \['prompt', 'answer'\]"):
        read_records([str(p)], ("prompt", "answer"))
    p.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_records([str(p)], ("prompt", "answer"))
    with pytest.raises(DataError, match="not found"):
        read_records([str(tmp_path / "missing.jsonl")], ("prompt", "answer"))


def test_collate_pads_right_and_masks(tok):
    a = encode_prompt_answer(tok, "Review: x\nSentiment:", " positive", 64)
    b = encode_prompt_answer(tok, "Review: the soup was lovely indeed\nSentiment:", " positive", 64)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    n = len(a["input_ids"])
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_sampler_ranks_disjoint_and_layout_independent():
    world = [GlobalBatchSampler(100, micro=4, accum=1, world=2, rank=r, seed=3) for r in (0, 1)]
    single = GlobalBatchSampler(100, micro=4, accum=2, world=1, rank=0, seed=3)
    for step in range(30):  # crosses several epochs
        r0, r1 = (s.micro_batches(step) for s in world)
        assert not set(r0[0]) & set(r1[0])
        # 2 ranks x 1 micro-batch see exactly what 1 rank x 2 micro-batches sees, in order
        assert single.micro_batches(step) == [r0[0], r1[0]]
    # every example is seen once per epoch
    seen = [i for step in range(13) for mb in single.micro_batches(step) for i in mb][:100]
    assert sorted(seen) == list(range(100))
