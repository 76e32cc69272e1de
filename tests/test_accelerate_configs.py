from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
EXPECTED = {  # file: (distributed type, processes, machines, mixed precision)
    "cpu_1proc.yaml": ("NO", 1, 1, "no"),
    "cpu_2proc_gloo.yaml": ("MULTI_GPU", 2, 1, "no"),
    "cpu_2proc_fsdp.yaml": ("FSDP", 2, 1, "no"),
    "gpu_1.yaml": ("NO", 1, 1, "bf16"),
    "gpu_2.yaml": ("MULTI_GPU", 2, 1, "bf16"),
    "gpu_4.yaml": ("MULTI_GPU", 4, 1, "bf16"),
    "gpu_8.yaml": ("MULTI_GPU", 8, 1, "bf16"),
    "gpu_8_fsdp.yaml": ("FSDP", 8, 1, "bf16"),
    "multinode_2x8_template.yaml": ("MULTI_GPU", 16, 2, "bf16"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_valid_for_accelerate(name):
    cfg = load_config_from_file(str(CONFIGS / name))
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines, str(cfg.mixed_precision)) == EXPECTED[name]


def test_every_shipped_config_is_checked():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", ["cpu_2proc_fsdp.yaml", "gpu_8_fsdp.yaml"])
def test_fsdp_configs_shard_each_transformer_block_with_fsdp2(name):
    from accel_gpt.model import TransformerBlock

    fsdp = load_config_from_file(str(CONFIGS / name)).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == TransformerBlock.__name__
