import pytest
from transformers import AutoTokenizer

from sft_scale.data import GlobalBatchSampler, collate
from sft_scale.data.tokenize import IGNORE_INDEX, encode_example
from sft_scale.model_source import resolve_model_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def encode_prompt_answer(tokenizer, prompt: str, answer: str, max_seq_len: int) -> dict:
    return encode_example(tokenizer, {"kind": "completion", "prompt": prompt,
                                      "completion": answer}, max_seq_len)


def trained_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True)
                       if lab != IGNORE_INDEX])


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
    untrained = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True)
                 if lab == IGNORE_INDEX]
    assert tok.decode(untrained) == tok.bos_token + prompt
    # labels equal the input ids wherever they are trained
    assert all(lab in (IGNORE_INDEX, t)
               for t, lab in zip(enc["input_ids"], enc["labels"], strict=True))


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



@pytest.mark.parametrize("n", [32, 96, 1000])
def test_length_grouping_trains_every_example_once_per_epoch(n):
    """Regression: a grouping window longer than the data (32 examples, global batch 8) once
    held 8 copies of each example, and sorting by length made batches of one example repeated."""
    lengths = [(i * 37) % 251 + 5 for i in range(n)]
    s = GlobalBatchSampler(n, micro=4, accum=1, world=2, rank=0, seed=1, lengths=lengths)
    per_epoch = n // s.global_batch  # n is a multiple of the global batch here
    for e in range(3):
        seen = [i for step in range(e * per_epoch, (e + 1) * per_epoch)
                for i in s.global_batch_indices(step)]
        assert sorted(seen) == list(range(n))
    if n >= 96:  # grouped: a batch spans far less than the data's length range of 246
        widths = [max(lengths[i] for i in s.global_batch_indices(k))
                  - min(lengths[i] for i in s.global_batch_indices(k)) for k in range(per_epoch)]
        assert sum(widths) / len(widths) < 60


def test_length_grouping_never_repeats_an_example_within_a_batch():
    n = 100  # not a multiple of the global batch: one batch per epoch straddles two epochs
    s = GlobalBatchSampler(n, micro=4, accum=1, world=2, rank=0, seed=1,
                           lengths=[(i * 37) % 251 + 5 for i in range(n)])
    for step in range(60):
        batch = s.global_batch_indices(step)
        assert len(set(batch)) == len(batch), (step, batch)
    stream = [i for step in range(25) for i in s.global_batch_indices(step)]  # 2 epochs exactly
    assert sorted(stream) == sorted(list(range(n)) * 2)
