"""VitrailConfig: ViT field names, the size table, derived values and construction-time validation."""

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, ViTConfig

from vitrail import VARIANTS, VitrailConfig

from .conftest import tiny_config


def test_defaults_are_vit_b16():
    config = VitrailConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 3072 and config.patch_size == 16 and config.image_size == 224
    assert config.num_patches == 196 and config.num_prefix_tokens == 1 and config.num_prefix_positions == 1


def test_vit_field_names_carry_over():
    """Every field ViTConfig has (bar its tanh pooler) means the same thing in VitrailConfig."""
    shared = set(ViTConfig().to_diff_dict()) & set(VitrailConfig().to_dict())
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                 "image_size", "patch_size", "num_channels", "qkv_bias", "encoder_stride"):  # fmt: skip
        assert hasattr(VitrailConfig(), name)
        assert getattr(VitrailConfig(), name) == getattr(ViTConfig(), name), name
    assert "hidden_size" in shared


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("patch", [14, 16, 32])
def test_from_variant_table(name, patch):
    config = VitrailConfig.from_variant(f"{name}/{patch}", num_labels=3)
    width, depth, heads, mlp = VARIANTS[name]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, depth, heads)
    assert config.intermediate_size == mlp and config.patch_size == patch and config.num_labels == 3


def test_from_variant_overrides_and_errors():
    config = VitrailConfig.from_variant("S/16", image_size=384, pooling="mean", use_cls_token=False)
    assert config.grid_size == (24, 24) and config.prefix_position_embeddings == "none"
    for bad in ("X/16", "B16", "B/", "B/-2", "B/abc"):
        with pytest.raises(ValueError, match="Unknown variant"):
            VitrailConfig.from_variant(bad)


def test_derived_values_non_square():
    config = tiny_config(image_size=(30, 22), num_register_tokens=4)
    assert config.image_hw == (30, 22) and config.grid_size == (15, 11) and config.num_patches == 165
    assert config.num_prefix_tokens == 5 and config.num_prefix_positions == 1
    assert tiny_config(num_register_tokens=4, prefix_position_embeddings="all").num_prefix_positions == 5
    distilled = tiny_config(
        use_distillation_token=True, num_register_tokens=2, prefix_position_embeddings="all"
    )
    assert distilled.num_prefix_tokens == 4 and distilled.num_prefix_positions == 4


def test_round_trip_and_auto_config(tmp_path):
    config = tiny_config(pooling="mean", num_register_tokens=2, qk_norm=True, layer_scale_init_value=1e-4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VitrailConfig
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by `num_attention_heads`"),
        (dict(image_size=31), "not divisible by `patch_size`"),
        (dict(pooling="max"), "Unknown `pooling`"),
        (dict(mlp_type="geglu"), "Unknown `mlp_type`"),
        (dict(position_interpolation="bilinear"), "Unknown `position_interpolation`"),
        (dict(use_distillation_token=True, use_cls_token=False, pooling="mean"), "after the class token"),
        (dict(use_cls_token=False), "reads the class token"),
        (dict(position_embedding_type="rope"), "Unknown `position_embedding_type`"),
        (dict(position_embedding_type="sincos2d", hidden_size=30, num_attention_heads=5), "divisible by 4"),
        (dict(position_embedding_type="sincos2d", prefix_position_embeddings="cls"), "needs"),
        (dict(prefix_position_embeddings="everything"), "Unknown `prefix_position_embeddings`"),
        (dict(drop_path_rate=1.5), "probability"),
        (dict(layer_scale_init_value=0.0), "positive"),
        (dict(num_register_tokens=-1), ">= 0"),
        (dict(num_hidden_layers=0), "positive"),
        (dict(image_size=[30, 30, 3]), "(height, width) pair"),
        (dict(layer_norm_eps=-1.0), "`layer_norm_eps` is added to the variance.*got -1.0"),
        (dict(layer_norm_eps=0.0), "`layer_norm_eps` .* positive finite number"),
        (dict(layer_norm_eps=float("nan")), "`layer_norm_eps` .* got nan"),
        (dict(layer_norm_eps=float("inf")), "`layer_norm_eps` .* got inf"),
        (dict(initializer_range=0.0), "`initializer_range` is the standard deviation.*got 0.0"),
        (dict(initializer_range=-0.02), "`initializer_range` .* positive finite number"),
        (dict(initializer_range=float("inf")), "`initializer_range` .* got inf"),
        (dict(layer_scale_init_value=float("nan")), "`layer_scale_init_value` must be a positive finite"),
        (dict(layer_scale_init_value=float("inf")), "`layer_scale_init_value` .* got inf"),
        (dict(hidden_dropout_prob=float("nan")), "`hidden_dropout_prob` is a probability"),
        (dict(attention_probs_dropout_prob=-0.1), "`attention_probs_dropout_prob` is a probability"),
        (dict(id2label={0: "cat", 2: "dog"}), r"`id2label` must number the classes 0..1 .* got ids \[0, 2\]"),
        (dict(id2label={1: "cat"}), r"`id2label` must number the classes 0..0"),
        (dict(problem_type="multiclass"), "Unknown `problem_type` 'multiclass'"),
    ],
)
def test_invalid_values_fail_at_construction(overrides, fragment):
    if "\\" not in fragment and ".*" not in fragment:  # plain text
        fragment = fragment.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(StrictDataclassError, match=fragment):
        tiny_config(**overrides)


def test_dynamic_size_allows_indivisible_image_size():
    config = tiny_config(image_size=31, dynamic_image_size=True)
    assert config.grid_size == (16, 16)


def test_wrong_field_type_is_rejected():
    with pytest.raises(StrictDataclassError):
        VitrailConfig(qk_norm="yes")
