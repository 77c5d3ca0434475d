"""Module selection and file keys on the real SD1.5 / SD2.1 / SDXL architectures (meta device)."""
import pytest

from lokr_diffusion import AdapterConfig, create_network
from lokr_diffusion.families import get_family
from lokr_diffusion.naming import diffusers_to_ldm

# spec: module counts per preset, (unet, text encoders...)
COUNTS = {
    "sd15": {"attn-only": (128, 48), "attn-mlp": (192, 72), "full": (282, 72)},
    "sd2": {"attn-only": (128, 92), "attn-mlp": (192, 138), "full": (282, 138)},
    "sdxl": {"attn-only": (560, 48, 128), "attn-mlp": (722, 72, 192), "full": (788, 72, 192)},
}


@pytest.fixture(scope="module", params=sorted(COUNTS))
def meta_models(request):
    return request.param, get_family(request.param).build_meta()


def _count(network, component):
    return sum(1 for c in network.components.values() if c == component)


def test_module_counts_per_preset(meta_models):
    family, (unet, tes) = meta_models
    for preset, expected in COUNTS[family].items():
        net = create_network(AdapterConfig(algo="lokr", preset=preset, factor=8, dim=4, conv_dim=4),
                             unet=unet, text_encoders=tes)
        comps = ["unet"] + (["te"] if len(tes) == 1 else ["te1", "te2"])
        got = tuple(_count(net, c) for c in comps)
        assert got == expected, (family, preset, got)
        net.remove()


def test_keys_follow_the_spec(meta_models):
    family, (unet, tes) = meta_models
    net = create_network(AdapterConfig(preset="full", conv_dim=4), unet=unet, text_encoders=tes)
    keys = set(net.module_keys())
    if family == "sdxl":
        for k in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
                  "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_1_0_out_layers_3",
                  "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                  "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
                  "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                  "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"]:
            assert k in keys, k
        assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
        assert not any("input_blocks_0_0" in k or "time_embed" in k or "out_2" in k for k in keys)
    else:
        for k in ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                  "lora_unet_mid_block_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                  "lora_unet_conv_in", "lora_unet_time_embedding_linear_1",
                  "lora_te_text_model_encoder_layers_0_mlp_fc1"]:
            assert k in keys, k
    assert not any(k.startswith(("lora_te_encoder", "lora_te1_encoder", "lora_te2_encoder")) for k in keys)
    net.remove()


def test_kxk_convs_need_conv_dim():
    unet, tes = get_family("sd15").build_meta()
    net = create_network(AdapterConfig(preset="full"), unet=unet, text_encoders=tes)
    assert not any(k.endswith(("_conv1", "_conv2", "_conv_in")) for k in net.module_keys())
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in net.module_keys()  # 1x1: linear settings
    net.remove()


def test_include_exclude_patterns():
    unet, tes = get_family("sd15").build_meta()
    net = create_network(AdapterConfig(preset="attn-only", exclude=("*attn1*",), include=("lora_unet_conv_out",),
                                       conv_dim=2), unet=unet, text_encoders=())
    keys = net.module_keys()
    assert len(keys) == 64 + 1 and "lora_unet_conv_out" in keys and not any("attn1" in k for k in keys)
    net.remove()


def test_sdxl_block_mapping_table():
    up_attn = frozenset({0, 1})
    assert diffusers_to_ldm("down_blocks.1.attentions.1.proj_in", 2, up_attn) == "input_blocks.5.1.proj_in"
    assert diffusers_to_ldm("down_blocks.2.resnets.0.conv_shortcut", 2, up_attn) == "input_blocks.7.0.skip_connection"
    assert diffusers_to_ldm("down_blocks.1.downsamplers.0.conv", 2, up_attn) == "input_blocks.6.0.op"
    assert diffusers_to_ldm("mid_block.resnets.1.time_emb_proj", 2, up_attn) == "middle_block.2.emb_layers.1"
    assert diffusers_to_ldm("up_blocks.2.resnets.2.conv2", 2, up_attn) == "output_blocks.8.0.out_layers.3"
    assert diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", 2, up_attn) == "output_blocks.2.2.conv"
    assert diffusers_to_ldm("up_blocks.2.upsamplers.0.conv", 2, frozenset({1})) == "output_blocks.8.1.conv"
    assert diffusers_to_ldm("time_embedding.linear_2", 2, up_attn) == "time_embed.2"
    assert diffusers_to_ldm("some.other.path", 2, up_attn) is None


def test_parameter_counts_match_the_math():
    unet, tes = get_family("sd15").build_meta()
    net = create_network(AdapterConfig(preset="attn-only", factor=8, dim=10000), unet=unet, text_encoders=())
    per = net.num_parameters(per_module=True)
    # to_q of block 0: 320x320, factor 8 -> w1 (8, 8), w2 (40, 40) full
    assert per["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 8 * 8 + 40 * 40
    assert net.num_parameters() == sum(per.values())
    net.remove()
