"""`data.packing: auto` from the tokenized lengths: padded batches where they would barely pad,
packed rows otherwise; an explicit `packing: true/false` and classification are never touched."""

import json
import random

import pytest

from sft_scale.cli import main
from sft_scale.data import GlobalBatchSampler
from sft_scale.data.layout import PADDED_FROM, choose_layout, padded_efficiency
from tests.helpers import DEMO_CONFIG


def test_equal_lengths_pad_nothing_and_choose_padded_batches():
    assert padded_efficiency([96] * 64, micro=8) == 1.0
    pack, why = choose_layout([96] * 64, micro=8)
    assert pack is False
    assert why.startswith("auto: off, the data pads only 0.0%")


def test_a_wide_length_mix_is_packed():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(512)]
    pack, why = choose_layout(lengths, micro=8, grouped=False)
    assert pack is True and why.startswith("auto: on,")
    eff = padded_efficiency(lengths, micro=8, grouped=False)
    assert eff < PADDED_FROM and f"{eff:.1%} real tokens" in why


def test_the_threshold_is_on_the_padded_batches_efficiency():
    # One micro-batch of ten: nine of 100 tokens and one of x pad 100 - x of 1,000 slots.
    x = round(1000 * PADDED_FROM) - 900
    at, under = [100] * 9 + [x], [100] * 9 + [x - 1]
    assert padded_efficiency(at, micro=10) == pytest.approx(PADDED_FROM)
    assert choose_layout(at, micro=10)[0] is False
    assert choose_layout(under, micro=10)[0] is True


def test_the_estimate_is_what_the_sampler_would_batch():
    rng = random.Random(1)
    lengths = [rng.randint(20, 300) for _ in range(200)]
    micro, accum, world, seed = 4, 2, 2, 7
    sampler = GlobalBatchSampler(len(lengths), micro, accum, world, 0, seed, lengths=lengths)
    real = slots = 0
    for step in range(-(-len(lengths) // sampler.global_batch)):
        for rank in range(world):
            s = GlobalBatchSampler(len(lengths), micro, accum, world, rank, seed, lengths=lengths)
            for mb in s.micro_batches(step):
                real += sum(lengths[i] for i in mb)
                slots += len(mb) * max(lengths[i] for i in mb)
    assert padded_efficiency(lengths, micro, accum, world, seed) == pytest.approx(real / slots)
    # grouping is what makes padded batches efficient
    assert padded_efficiency(lengths, micro, accum, world, seed, grouped=False) < real / slots


def test_check_reports_the_layout_the_lengths_choose(tmp_path, capsys):
    """`sft-scale check` decides auto packing from the tokenized sample, as the job does after
    tokenizing (train.run), and reports it with the fast paths; an explicit setting is obeyed."""
    same = tmp_path / "same.jsonl"  # every record one length: padded batches hold no padding
    record = {"prompt": "Review: the soup was lovely\nSentiment:", "completion": " positive"}
    same.write_text((json.dumps(record) + "\n") * 40)
    base = ["check", "--config", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"),
            "--json"]

    def check(*sets):
        assert main(base + [a for s in sets for a in ("--set", s)]) == 0
        text = capsys.readouterr().out
        return json.loads(text[text.index("{"):text.rindex("}") + 1])["fast_paths"], text

    fast, text = check(f"data.train_files=[{same}]", "data.eval_files=[]")
    assert fast["packing"] is False and fast["attention_kernel"] == "sdpa"
    assert "packing, from the sample's lengths: auto: off, the data pads only 0.0%" in text
    fast, text = check(f"data.train_files=[{same}]", "data.eval_files=[]", "data.packing=true")
    assert fast["packing"] is True and "from the sample's lengths" not in text
    # the demo's short reviews pad 1.6% even grouped by length: packed
    fast, text = check()
    assert fast["packing"] is True and fast["attention_kernel"] == "sdpa per packed example"
    assert "packing, from the sample's lengths: auto: on," in text


def test_only_an_auto_that_resolved_on_is_left_to_the_lengths():
    """Resolved.with_data hands the lengths to choose_layout only where `packing: auto` resolved
    on: never for classification, an explicit setting or eager attention."""
    from transformers import LlamaConfig

    from sft_scale.config import Config
    from sft_scale.preflight.resolve import resolve_fast_paths

    def by_lengths(task="causal_lm", **sections):
        cfg = Config()
        cfg.task = task
        for section, values in sections.items():
            for k, v in values.items():
                setattr(getattr(cfg, section), k, v)
        return resolve_fast_paths(cfg, None, LlamaConfig()).packing_by_lengths

    assert by_lengths()
    assert not by_lengths(data={"packing": True})
    assert not by_lengths(data={"packing": False})
    assert not by_lengths(model={"attn_implementation": "eager"})
    assert not by_lengths("classification")


def test_with_data_pads_equal_lengths_and_keeps_the_config_as_written():
    from transformers import LlamaConfig

    from sft_scale.config import Config
    from sft_scale.preflight.resolve import Resolved, resolve_fast_paths

    cfg = Config()
    fast = resolve_fast_paths(cfg, None, LlamaConfig())
    before = Resolved("m", None, 1, 8, None, False, None, None, None, fast)
    equal = before.with_data(cfg, [96] * 64, 10)
    assert (equal.fast.packing, equal.fast.attention_kernel, equal.total_steps) == \
        (False, "sdpa", 10)
    assert equal.fast.group_by_length is cfg.data.group_by_length
    assert equal.fast.packing_reason.startswith("auto: off, the data pads only 0.0%")
    mixed = before.with_data(cfg, [10, 250, 60, 180], 10)  # one micro-batch of 4: 50% real
    assert mixed.fast.packing and mixed.fast.as_dict()["attention_kernel"] == \
        "sdpa per packed example"
    assert cfg.data.packing == "auto"
