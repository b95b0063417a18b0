"""LoRA settings checked against the model built on the meta device, before any weights load."""

import pytest
from transformers import AutoConfig

from sft_scale.config import ConfigError, load_config
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import check_lora_fits
from tests.helpers import DEMO_CONFIG


@pytest.fixture(scope="module")
def mc():
    # tiny-llama: hidden 64, 4 heads of 16, 2 KV heads: k_proj and v_proj map 64 -> 32.
    return AutoConfig.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def cfg_with(*sets):
    return load_config(DEMO_CONFIG, list(sets))


def test_target_modules_that_exist_and_a_rank_that_fits_pass(mc):
    # Each would raise a ConfigError if refused.
    assert check_lora_fits(cfg_with("lora.target_modules=[q_proj, v_proj]", "lora.r=32"), mc) \
        is None
    assert check_lora_fits(cfg_with("lora.target_modules=all-linear"), mc) is None
    # PEFT adapts embeddings too
    assert check_lora_fits(cfg_with("lora.target_modules=[embed_tokens]"), mc) is None
    # full fine-tuning: no rank to fit
    assert check_lora_fits(cfg_with("lora.enabled=false", "lora.r=4096"), mc) is None


def test_unknown_target_modules_are_named_with_the_modules_that_exist(mc):
    with pytest.raises(ConfigError, match=r"'lora.target_modules': 'v_prj', 'query' names no "
                                          r"module of this llama model. Its Linear layers are: "
                                          r"down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                          r"up_proj, v_proj; or use 'all-linear'"):
        check_lora_fits(cfg_with("lora.target_modules=[q_proj, v_prj, query]"), mc)
    with pytest.raises(ConfigError, match=r"lora.target_modules=.*qkv' matches no Linear layer; "
                                          r"this model has \['down_proj'"):
        check_lora_fits(cfg_with(r"lora.target_modules=.*attn\.qkv"), mc)


def test_a_rank_larger_than_the_layers_it_adapts_is_refused(mc):
    with pytest.raises(ConfigError, match=r"'lora.r' \(33\) is larger than the layers it adapts: "
                                          r"model.layers.0.self_attn.k_proj maps 64 -> 32, so a "
                                          r"rank above 32 adds parameters and no capacity"):
        check_lora_fits(cfg_with("lora.r=33"), mc)
    # Only the targeted layers count: q_proj alone is 64 -> 64.
    check_lora_fits(cfg_with("lora.r=64", "lora.target_modules=[q_proj]"), mc)
