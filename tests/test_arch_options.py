"""The layout options of other ViT families (CLIP, SigLIP, EVA-02, AIMv2, ...): norm kind and placement, biases,
attention pooling. Each option is built twice, as timm builds it and as vitrail does, with the same random weights
copied in by a name map: equal logits prove the math. Then every option keeps the model's promises: eager == sdpa,
dynamic sizes, the backbone, chosen-layer attentions, attention maps, export, gradient checkpointing, and loading
where vitrail is not installed."""

import copy
import json
import re
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

timm = pytest.importorskip("timm")
from timm.layers import AttentionPoolLatent, GELUTanh, LayerNorm, SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import vitrail.modeling_vitrail  # noqa: E402
from vitrail import (  # noqa: E402
    VitrailBackbone,
    VitrailConfig,
    VitrailForImageClassification,
    VitrailModel,
)
from vitrail.export import export_program  # noqa: E402
from vitrail.visualize import attention_maps  # noqa: E402

from .conftest import TINY, run_without_vitrail, tiny_config  # noqa: E402

TOLERANCE = 1e-5
LABELS = 5
# timm's tiny twin of conftest's TINY (37 MLP units: mlp_ratio 37/32); dynamic sizes padded as vitrail pads them.
TIMM_TINY = dict(
    img_size=30,
    patch_size=2,
    embed_dim=32,
    depth=2,
    num_heads=4,
    mlp_ratio=37 / 32,
    num_classes=LABELS,
    dynamic_img_size=True,
    dynamic_img_pad=True,
)
OTHER_SIZE = (22, 27)  # 11 x 14 patches, the width padded by one pixel

# (id, vitrail config fields, timm VisionTransformer arguments). timm ties the patch bias to `pre_norm` and the MLP
# biases to `proj_bias`, so those options are compared together here and alone in `test_bias_options_alone`.
CASES = [
    ("pre_norm", dict(pre_norm=True, patch_embedding_bias=False), dict(pre_norm=True)),
    ("map", dict(pooling="map", use_cls_token=False), dict(class_token=False, global_pool="map")),
    (
        "map_prefix_tokens",
        dict(pooling="map", num_register_tokens=2, prefix_position_embeddings="all"),
        dict(global_pool="map", reg_tokens=2, pool_include_prefix=True),
    ),
    (
        "map_sizes",
        dict(
            pooling="map",
            use_cls_token=False,
            map_num_heads=2,
            map_intermediate_size=19,
            hidden_act="gelu_pytorch_tanh",
        ),
        dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),  # pool replaced in `reference`
    ),
    (
        "map_fc_norm",
        dict(pooling="map", use_cls_token=False, use_fc_norm=True),
        dict(class_token=False, global_pool="map", fc_norm=True),
    ),
    ("no_final_norm", dict(final_norm=False), dict(final_norm=False)),
    ("attention_norm", dict(attention_norm=True), dict(scale_attn_norm=True)),
    ("mlp_norm", dict(mlp_norm=True), dict(scale_mlp_norm=True)),
    (
        "mlp_norm_swiglu",
        dict(mlp_norm=True, mlp_type="swiglu", hidden_act="silu"),
        dict(scale_mlp_norm=True, mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=74 / 32),
    ),
    ("patch_embedding_norm", dict(patch_embedding_norm=True), dict(embed_norm_layer="layernorm")),
    ("rmsnorm", dict(norm_type="rmsnorm", qk_norm=True), dict(norm_layer="rmsnorm", qk_norm=True)),
    ("no_proj_mlp_bias", dict(proj_bias=False, mlp_bias=False), dict(proj_bias=False)),
    (
        "all_together",
        dict(
            norm_type="rmsnorm",
            patch_embedding_bias=False,
            patch_embedding_norm=True,
            pre_norm=True,
            attention_norm=True,
            mlp_norm=True,
            proj_bias=False,
            mlp_bias=False,
            pooling="map",
            num_register_tokens=1,
            prefix_position_embeddings="all",
        ),
        dict(
            norm_layer="rmsnorm",
            embed_norm_layer="rmsnorm",
            pre_norm=True,
            scale_attn_norm=True,
            scale_mlp_norm=True,
            proj_bias=False,
            global_pool="map",
            reg_tokens=1,
            pool_include_prefix=True,
        ),
    ),
]
IDS = [case[0] for case in CASES]
# Export is the slow check (seconds each): these four between them hold every option.
EXPORTED = ["all_together", "map_sizes", "no_final_norm", "mlp_norm_swiglu"]

# timm's parameter names -> vitrail's, first match wins.
RENAMES = [
    (r"patch_embed\.proj\.", "vitrail.embeddings.patch_embeddings.projection."),
    (r"patch_embed\.norm\.", "vitrail.embeddings.patch_embeddings.norm."),
    (r"cls_token", "vitrail.embeddings.cls_token"),
    (r"reg_token", "vitrail.embeddings.register_tokens"),
    (r"pos_embed", "vitrail.embeddings.position_embeddings"),
    (r"norm_pre\.", "vitrail.embeddings.pre_norm."),
    (r"blocks\.(\d+)\.attn\.", r"vitrail.encoder.layers.\1.attention."),
    (r"blocks\.(\d+)\.", r"vitrail.encoder.layers.\1."),
    (r"(?:fc_)?norm\.", "vitrail.layernorm."),
    (r"attn_pool\.", "vitrail.attention_pool."),
    (r"head\.", "classifier."),
]


def vitrail_name(timm_name: str) -> str:
    for pattern, replacement in RENAMES:
        name, count = re.subn(f"^{pattern}", replacement, timm_name)
        if count:
            return name
    raise KeyError(f"no vitrail name for timm's {timm_name}")


def reference(name: str, timm_options: dict, seed: int) -> VisionTransformer:
    """timm's model for a case, every parameter drawn from N(0, 0.3²)."""
    model = VisionTransformer(**{**TIMM_TINY, **timm_options})
    if name == "map_sizes":  # timm's ViT sizes its pool from the model; built alone it takes any size
        model.attn_pool = AttentionPoolLatent(
            32, num_heads=2, mlp_ratio=19 / 32, norm_layer=LayerNorm, act_layer=GELUTanh
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def pixels(size=(30, 30), batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """For each case: timm's model, vitrail's with the same weights (copied by name, every tensor used), saved."""
    root = tmp_path_factory.mktemp("arch_options")
    made = {"root": root}
    for seed, (name, fields, timm_options) in enumerate(CASES):
        timm_model = reference(name, timm_options, seed)
        config = tiny_config(num_labels=LABELS, dynamic_image_size=True, **fields)
        model = VitrailForImageClassification(config).eval()
        model.load_state_dict({vitrail_name(k): v for k, v in timm_model.state_dict().items()}, strict=True)
        model.save_pretrained(root / name)
        made[name] = (timm_model, model)
    return made


# ---- the math: timm's modules, same weights ---------------------------------------------------------------------


@pytest.mark.parametrize("name", IDS)
def test_parity_with_timm(built, name):
    """Logits equal timm's at the native size and, dynamic, at another one (padding, resampled positions)."""
    timm_model, model = built[name]
    for size in ((30, 30), OTHER_SIZE):
        inputs = pixels(size)
        with torch.no_grad():
            torch.testing.assert_close(model(inputs).logits, timm_model(inputs), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "field, names",
    [
        ("patch_embedding_bias", ["vitrail.embeddings.patch_embeddings.projection.bias"]),
        ("proj_bias", [f"vitrail.encoder.layers.{i}.attention.proj.bias" for i in range(2)]),
        ("mlp_bias", [f"vitrail.encoder.layers.{i}.mlp.fc{j}.bias" for i in range(2) for j in (1, 2)]),
    ],
)
def test_bias_options_alone(field, names):
    """Without the bias, the model is the default one with exactly those biases at zero."""
    with_bias = VitrailForImageClassification(tiny_config(num_labels=LABELS)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in with_bias.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    without = VitrailForImageClassification(tiny_config(num_labels=LABELS, **{field: False})).eval()
    result = without.load_state_dict(with_bias.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(names)
    with torch.no_grad():
        for name in names:
            with_bias.get_parameter(name).zero_()
        torch.testing.assert_close(
            without(pixels()).logits, with_bias(pixels()).logits, atol=TOLERANCE, rtol=0
        )


def test_attention_pool_reads_every_token_after_the_final_norm():
    """MAP written out for one image: a learned query attends over all tokens (class and registers included) of
    the normed sequence, per head, then x + mlp(norm(x))."""
    model = VitrailModel(tiny_config(pooling="map", num_register_tokens=2, map_num_heads=2)).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        out = model(pixels(batch=1))
        pool = model.attention_pool
        tokens = out.last_hidden_state[0]  # (N, D), after the final norm
        assert tokens.shape[0] == 3 + 225
        query = pool.q(pool.latent[0, 0])  # (D,)
        keys, values = pool.kv(tokens).split(32, dim=-1)  # rows [k; v]
        heads = []
        for h in range(2):
            part = slice(16 * h, 16 * (h + 1))
            weights = torch.softmax(keys[:, part] @ query[part] / 16**0.5, dim=0)  # (N,)
            heads.append(weights @ values[:, part])
        pooled = pool.proj(torch.cat(heads))
        pooled = pooled + pool.mlp.fc2(torch.nn.functional.gelu(pool.mlp.fc1(pool.norm(pooled))))
    torch.testing.assert_close(out.pooler_output[0], pooled, atol=TOLERANCE, rtol=0)
    assert pool.mlp.fc1.out_features == 37  # map_intermediate_size defaults to intermediate_size


def test_attention_pool_equals_siglip_head():
    """transformers' SigLIP head (`nn.MultiheadAttention`, packed rows `[q; k; v]`) with its weights split into
    `q` and `kv` gives the same pooled vectors."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    fields = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, hidden_act="gelu_pytorch_tanh")
    head = SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(layer_norm_eps=1e-6, **fields)).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    pool = VitrailModel(tiny_config(pooling="map", use_cls_token=False, **fields)).attention_pool.eval()
    packed_weight, packed_bias = head.attention.in_proj_weight, head.attention.in_proj_bias
    pool.load_state_dict(
        {
            "latent": head.probe,
            "q.weight": packed_weight[:32],
            "q.bias": packed_bias[:32],
            "kv.weight": packed_weight[32:],
            "kv.bias": packed_bias[32:],
            **{f"proj.{k}": v for k, v in head.attention.out_proj.state_dict().items()},
            **{f"norm.{k}": v for k, v in head.layernorm.state_dict().items()},
            **{f"mlp.{k}": v for k, v in head.mlp.state_dict().items()},
        },
        strict=True,
    )
    tokens = torch.randn(2, 50, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pool(tokens), head(tokens), atol=TOLERANCE, rtol=0)


# ---- the promises, option by option -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", IDS)
def test_eager_equals_sdpa(built, name, monkeypatch):
    _, model = built[name]
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs),
    )
    inputs = pixels(OTHER_SIZE)
    with torch.no_grad():
        sdpa = model(inputs).logits
        model.set_attn_implementation("eager")
        try:
            eager = model(inputs).logits
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager, sdpa, atol=TOLERANCE, rtol=0)
    # The attention pool runs on the configured kernel, as the layers do.
    assert len(calls) == 2 + (model.config.pooling == "map")


@pytest.mark.parametrize("name", IDS)
def test_chosen_layer_attentions(built, name):
    _, model = built[name]
    inputs = pixels(OTHER_SIZE)
    with torch.no_grad():
        plain = model(inputs)
        chosen = model(inputs, output_attentions=[-1])
        model.set_attn_implementation("eager")
        try:
            every = model(inputs, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
    prefix = model.config.num_prefix_tokens
    assert chosen.attentions[0] is None
    assert chosen.attentions[1].shape == (2, 4, prefix + 11 * 14, prefix + 11 * 14)
    torch.testing.assert_close(chosen.attentions[1], every.attentions[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen.logits, plain.logits, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", IDS)
def test_backbone_from_the_classifier(built, name):
    """The classifier's checkpoint opens as a backbone (the head, and the attention pool, left out); its maps are
    the model's hidden states, through the final norm when there is one, on the patch grid of any size."""
    _, model = built[name]
    backbone = VitrailBackbone.from_pretrained(built["root"] / name, out_indices=[1, 2]).eval()
    assert not any("attention_pool" in n for n in backbone.state_dict())
    inputs = pixels(OTHER_SIZE)
    with torch.no_grad():
        maps = backbone(inputs).feature_maps
        hidden = model.vitrail(inputs, output_hidden_states=True).hidden_states
    norm = model.vitrail.layernorm
    assert (norm is None) == (not model.config.final_norm) == (backbone.layernorm is None)
    for stage, feature_map in zip((1, 2), maps, strict=True):
        tokens = hidden[stage] if norm is None else norm(hidden[stage])
        expected = tokens[:, model.config.num_prefix_tokens :].reshape(2, 11, 14, 32).permute(0, 3, 1, 2)
        assert feature_map.shape == (2, 32, 11, 14)
        torch.testing.assert_close(feature_map, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", IDS)
def test_attention_maps(built, name):
    _, model = built[name]
    maps = attention_maps(model, pixels(OTHER_SIZE))
    assert maps.heads.shape == (2, 4, 11, 14) and maps.rollout.shape == (2, 11, 14)
    assert torch.isfinite(maps.heads).all()
    torch.testing.assert_close(maps.rollout.sum(dim=(-2, -1)) + maps.rollout_prefix_share, torch.ones(2))
    if model.config.pooling == "map":
        assert "attention-pooled" in maps.query


@pytest.mark.parametrize("name", EXPORTED)
def test_torch_export(built, name):
    _, model = built[name]
    program = export_program(model, dynamic_size=True).module()
    for size, batch in (((30, 30), 2), (OTHER_SIZE, 3)):
        inputs = pixels(size, batch)
        with torch.no_grad():
            torch.testing.assert_close(program(inputs), model(inputs).logits, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", IDS)
def test_gradient_checkpointing_gives_same_gradients(built, name):
    model = copy.deepcopy(built[name][1]).train()
    inputs, labels = pixels(OTHER_SIZE), torch.tensor([0, 3])

    def gradients():
        model.zero_grad()
        model(inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vitrail.encoder.layers)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


LOAD_EVERY_CASE = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    root = Path(sys.argv[1])
    references = load_file(str(root / "references.safetensors"))
    report = {}
    for name in json.loads((root / "cases.json").read_text()):
        model = AutoModelForImageClassification.from_pretrained(str(root / name), trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(references["inputs"]).logits
        report[name] = {
            "module": type(model).__module__,
            "diff": (logits - references[name]).abs().max().item(),
        }
    Path(sys.argv[2]).write_text(json.dumps(report))
    """
)


def test_saved_options_load_without_vitrail(built):
    """Every case's folder, loaded where vitrail cannot be imported, gives the same logits."""
    root = built["root"]
    inputs = pixels(OTHER_SIZE)
    references = {"inputs": inputs}
    with torch.no_grad():
        for name in IDS:
            references[name] = built[name][1](inputs).logits
    save_file(references, root / "references.safetensors")
    (root / "cases.json").write_text(json.dumps(IDS))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    report = run_without_vitrail(LOAD_EVERY_CASE, root, root=root, env=env)
    assert sorted(report) == sorted(IDS)
    for name, result in report.items():
        assert not result["module"].startswith("vitrail"), name
        assert result["diff"] <= TOLERANCE, (name, result)


# ---- configuration -------------------------------------------------------------------------------------------


def test_defaults_keep_the_original_layout():
    config = VitrailConfig(**TINY)
    assert (config.norm_type, config.pre_norm, config.final_norm, config.pooling) == (
        "layernorm",
        False,
        True,
        "cls",
    )
    names = set(VitrailModel(config).state_dict())
    assert "embeddings.patch_embeddings.projection.bias" in names and "layernorm.bias" in names
    new_parts = ("pre_norm", "patch_embeddings.norm", "attention.norm", "mlp.norm", "attention_pool")
    assert not [name for name in names if any(part in name for part in new_parts)]
    assert all(
        isinstance(m, torch.nn.LayerNorm)
        for m in VitrailModel(config).modules()
        if "Norm" in type(m).__name__
    )


def test_rmsnorm_is_every_norm():
    model = VitrailModel(
        tiny_config(
            norm_type="rmsnorm",
            pre_norm=True,
            qk_norm=True,
            attention_norm=True,
            mlp_norm=True,
            patch_embedding_norm=True,
            pooling="map",
        )
    )
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(norms) == 2 + 2 * 6 + 1 + 1  # patch + pre; per layer norm1/2, q/k, attention, mlp; final; pool
    assert all(isinstance(m, torch.nn.RMSNorm) and m.eps == 1e-6 for m in norms)
    assert model.encoder.layers[0].mlp.norm.normalized_shape == (37,)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(final_norm=False, use_fc_norm=True), "final_norm=False"),
        (dict(norm_type="batchnorm"), "Unknown `norm_type`"),
        (dict(pooling="attention"), "Unknown `pooling`"),
        (dict(map_intermediate_size=64), "only `pooling='map'`"),
        (dict(map_num_heads=2, pooling="mean"), "only `pooling='map'`"),
        (dict(pooling="map", map_intermediate_size=0), "positive integer"),
        (dict(pooling="map", map_num_heads=3), "divisible by `map_num_heads`"),
        (dict(pre_norm="yes"), "pre_norm"),
    ],
)
def test_inconsistent_options_are_refused(fields, match):
    with pytest.raises(StrictDataclassError, match=match):
        tiny_config(**fields)


def test_attention_pool_is_a_head_part(tmp_path):
    """A checkpoint without a pool opens in a MAP model, which gets a new one (as a new classifier head); its
    tensors are never half there."""
    VitrailModel(tiny_config()).save_pretrained(tmp_path / "cls")
    model = VitrailModel.from_pretrained(tmp_path / "cls", pooling="map")
    assert model.attention_pool is not None
    folder = tmp_path / "map"
    VitrailModel(tiny_config(pooling="map")).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["attention_pool.kv.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="attention_pool.kv.weight"):
        VitrailModel.from_pretrained(folder)
    assert vitrail.modeling_vitrail._HEAD_PART.fullmatch("vitrail.attention_pool.latent")
