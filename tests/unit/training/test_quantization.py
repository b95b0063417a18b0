"""4-bit (QLoRA) configuration, quantization x distribution refusals and optimizer checks: all
decided before any weights load."""

import pytest
import torch

from sft_scale.config import ConfigError, load_config
from sft_scale.preflight.command import Layout
from sft_scale.preflight.deepspeed import check_compatibility
from sft_scale.preflight.resolve import check_optimizer, resolve
from sft_scale.training.model import bnb_config, quant_storage_dtype
from tests.helpers import DEMO_CONFIG

Q4 = "quantization.load_in_4bit=true"


def test_4bit_config_defaults_follow_model_dtype_and_storage_follows_zero3():
    cfg = load_config(DEMO_CONFIG, [Q4])
    q = bnb_config(cfg)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32  # model.dtype fp32 in the demo
    assert q.bnb_4bit_quant_storage == torch.uint8
    # ZeRO-3 partitions floating tensors: the packed bytes are stored as the compute dtype
    assert bnb_config(cfg, zero_stage=3).bnb_4bit_quant_storage == torch.float32
    bf = load_config(DEMO_CONFIG, [Q4, "model.dtype=bf16"])
    assert quant_storage_dtype(bf, 3) == torch.bfloat16
    assert quant_storage_dtype(bf, 2) == torch.uint8
    explicit = load_config(DEMO_CONFIG, [Q4, "model.dtype=bf16",
                                         "quantization.bnb_4bit_quant_type=fp4",
                                         "quantization.bnb_4bit_use_double_quant=false",
                                         "quantization.bnb_4bit_compute_dtype=fp32"])
    q = bnb_config(explicit)
    assert q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32
    assert bnb_config(load_config(DEMO_CONFIG)) is None


def test_8bit_and_4bit_together_and_4bit_full_finetune_are_refused():
    with pytest.raises(ConfigError, match="load_in_8bit' and 'quantization.load_in_4bit' are both"):
        load_config(DEMO_CONFIG, [Q4, "quantization.load_in_8bit=true"])
    with pytest.raises(ConfigError, match="frozen 4-bit weights. Enable LoRA"):
        load_config(DEMO_CONFIG, [Q4, "lora.enabled=false"])
    with pytest.raises(ConfigError, match="expects one of 'nf4', 'fp4'"):
        load_config(DEMO_CONFIG, [Q4, "quantization.bnb_4bit_quant_type=int4"])


def deepspeed_on_two(cfg):
    return resolve(cfg, Layout.for_config(cfg, nproc_per_node=2)).deepspeed


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_4bit_is_accepted_under_every_zero_stage(zero):
    cfg = load_config(DEMO_CONFIG, [Q4, f"distributed.zero={zero}"])
    assert deepspeed_on_two(cfg)["zero_optimization"]["stage"] == zero


def test_4bit_zero3_with_byte_storage_is_refused_with_the_working_route():
    cfg = load_config(DEMO_CONFIG, [Q4, "distributed.zero=3",
                                    "quantization.bnb_4bit_quant_storage=uint8"])
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage: auto .* or use ZeRO-2"):
        deepspeed_on_two(cfg)


def test_bitsandbytes_optimizer_with_offload_is_refused():
    cfg = load_config(DEMO_CONFIG, ["training.optimizer=adamw_8bit", "distributed.zero=2",
                                    "distributed.offload=true"])
    with pytest.raises(ConfigError,
                       match="DeepSpeed's own CPU Adam.*Use training.optimizer: adamw"):
        deepspeed_on_two(cfg)
    check_compatibility(load_config(DEMO_CONFIG, ["training.optimizer=adamw_8bit"]),
                        {"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_are_refused_on_cpu_naming_the_device(name):
    cfg = load_config(DEMO_CONFIG, [f"training.optimizer={name}"])
    with pytest.raises(ConfigError, match=f"{name} pages optimizer state .* trains on cpu.*"
                                          f"Use training.optimizer: {name[6:]} here"):
        check_optimizer(cfg, "cpu")
    check_optimizer(cfg, "cuda")  # where bitsandbytes pages for real


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ConfigError,
                       match="training.optimizer' expects one of 'adamw', 'adamw_8bit'"):
        load_config(DEMO_CONFIG, ["training.optimizer=adam8"])


@pytest.mark.parametrize("name,cls", [("adamw", "torch.optim.adamw.AdamW"),
                                      ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW8bit")])
def test_build_optimizer_builds_the_named_one_with_the_configured_hyperparameters(name, cls):
    from sft_scale.training.loop import build_optimizer

    cfg = load_config(DEMO_CONFIG, [f"training.optimizer={name}", "training.weight_decay=0.1",
                                    "training.adam_beta2=0.95"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = build_optimizer(model, cfg)
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("manifest", [None, "unquantized"])
def test_merge_dequantize_needs_a_run_that_trained_quantized(tmp_path, manifest):
    import json

    from sft_scale.tools.merge import merge

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "builtin:tiny-llama"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    if manifest:
        (tmp_path / "run" / "manifest.json").write_text(json.dumps(
            {"config": load_config(DEMO_CONFIG).to_dict()}))
    why = "says the run trained on an unquantized base" if manifest else "is missing"
    with pytest.raises(ConfigError,
                       match=f"--dequantize: .*manifest.json {why}.*without --dequantize"):
        merge(str(adapter), str(tmp_path / "out"), dequantize=True)
    assert not (tmp_path / "out").exists()


def _linear4bit(out_features: int, cpu_repack: bool):
    """A real bitsandbytes Linear4bit on CPU, its weight quantized; `cpu_repack` stands for a
    CPU with AVX512-BF16 (the flag bitsandbytes reads from the CPU at construction)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, 64) * 0.1, requires_grad=False,
                                     quant_type="nf4")
    layer = layer.to("cpu")  # moving a Params4bit quantizes it
    assert layer.weight.bnb_quantized
    layer.support_avx512bf16_for_cpu = cpu_repack
    return layer


def test_4bit_layers_keep_their_layout_in_eval_on_any_cpu():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in eval mode, which needs
    out_features % 32 == 0 and in_features % 64 == 0: a 40-wide layer fails there (as every 4-bit
    run with validation did on an Intel Xeon). With the repack kept off it computes the same as
    without it. The CPU flag is set by hand: a CPU without AVX512-BF16 never repacks."""
    from sft_scale.training.model import keep_4bit_cpu_layout

    x = torch.randn(3, 64)
    plain = _linear4bit(40, cpu_repack=False).eval()
    with torch.no_grad():
        want = plain(x)
    layer = _linear4bit(40, cpu_repack=True).eval()
    with torch.no_grad(), pytest.raises(AssertionError, match="divisible"):
        layer(x)
    layer = _linear4bit(40, cpu_repack=True).eval()
    wide = _linear4bit(64, cpu_repack=True)
    model = torch.nn.ModuleList([layer, wide])
    assert keep_4bit_cpu_layout(model, all_layers=False) == 1  # inference: only the 40-wide
    assert not layer.support_avx512bf16_for_cpu and wide.support_avx512bf16_for_cpu
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    assert keep_4bit_cpu_layout(model, all_layers=True) == 1  # training: every layer
    assert not wide.support_avx512bf16_for_cpu
