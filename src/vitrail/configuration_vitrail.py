"""Configuration of vitrail's Vision Transformer.

This file travels to the Hub with every checkpoint: it imports only transformers and huggingface_hub.
No `from __future__ import annotations` here: `@strict` checks field types, and needs them as real types.
"""

import transformers

if int(transformers.__version__.split(".")[0]) < 5:  # the imports below exist in transformers 5 only
    raise ImportError(
        f"vitrail's checkpoint code needs transformers >= 5.0, not {transformers.__version__}: run "
        'pip install -U "transformers>=5".'
    )
import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# The fields that name one of a few choices, and their choices.
_CHOICES = {
    "mlp_type": ("mlp", "swiglu"),
    "pooling": ("cls", "mean", "cls_mean", "map"),
    "position_embedding_type": ("learned", "sincos2d", "none"),
    "prefix_position_embeddings": ("cls", "all", "none"),
    "position_interpolation": ("bicubic_antialias", "bicubic"),
    "norm_type": ("layernorm", "rmsnorm"),
    "rope_type": ("none", "axial", "mixed"),
    "rope_coordinates": ("index", "centered"),
    "rope_axis_order": ("yx", "xy"),
    "rope_layout": ("interleaved", "half"),
    "relative_position_bias": ("none", "table", "mlp"),
}

# Width, depth, heads and MLP size of the published ViT sizes. Ti/S/B/L/H come from Dosovitskiy et al. 2020 and
# Touvron et al. 2021 (DeiT); M, g and G from Zhai et al. 2021 ("Scaling Vision Transformers"), DINOv2 uses g.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
}


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


@strict
class VitrailConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a vitrail Vision Transformer. Defaults give ViT-B/16 at 224 px, laid out as in
    Dosovitskiy et al. 2020: a class token with a learned position, pre-norm layers, class-token pooling.
    Field names shared with transformers' `ViTConfig` mean the same thing here.

    Args:
        hidden_size (`int`, defaults to 768): width of every token.
        num_hidden_layers (`int`, defaults to 12): number of Transformer layers.
        num_attention_heads (`int`, defaults to 12): heads per attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden width of the MLP.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, any key of `transformers.activations.ACT2FN`
            (the gate's activation when `mlp_type="swiglu"`).
        mlp_type (`str`, defaults to `"mlp"`): `"mlp"` (fc1, activation, fc2) or `"swiglu"` (Shazeer 2020, as in
            DINOv2-g: `fc1` makes `2 * intermediate_size` features `[a; b]`, then `fc2(act(a) * b)`).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the embeddings, attention and MLP outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention weights.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal used for weights.
        layer_norm_eps (`float`, defaults to 1e-12): LayerNorm epsilon (1e-12 as in transformers' ViT; timm and
            big_vision use 1e-6).
        image_size (`int` or `(height, width)`, defaults to 224): the resolution the position table is made for.
        patch_size (`int` or `(height, width)`, defaults to 16): kernel and stride of the patch convolution.
        num_channels (`int`, defaults to 3): channels of the input images.
        qkv_bias (`bool`, defaults to `True`): bias in the query/key/value projection.
        encoder_stride (`int`, defaults to 16): upsampling factor of the masked-image-modeling decoder; must equal
            `patch_size` to reconstruct at input resolution.
        pooling (`str`, defaults to `"cls"`): the representation the head sees: `"cls"` (the class token),
            `"mean"` (mean of the patch tokens, big_vision's "gap"), `"cls_mean"` (both concatenated, as in
            DINOv2's linear classifier, giving `2 * hidden_size` features), or `"map"`, multi-head attention pooling
            (SigLIP, timm's `global_pool="map"`): a learned query attends over every output token, prefix tokens
            included, then `x + mlp(norm(x))`; the head's linears always have biases and its MLP is never gated.
        use_cls_token (`bool`, defaults to `True`): prepend a learned class token.
        use_distillation_token (`bool`, defaults to `False`): a learned distillation token right after the class
            token (Touvron et al. 2021, distilled DeiT). `VitrailForImageClassification` then has a second head,
            `distillation_classifier`, on that token, and its logits are the mean of both heads. (A DeiT fine-tuned
            without its teacher has the token but no head reading it; it converts to one register token.)
        num_register_tokens (`int`, defaults to 0): extra learned tokens (Darcet et al. 2023, "Vision Transformers
            Need Registers") placed after the class token; they are dropped from pooling.
        position_embedding_type (`str`, defaults to `"learned"`): `"learned"`, `"sincos2d"` (fixed 2D sin-cos,
            big_vision's `posemb="sincos2d"`), or `"none"`.
        prefix_position_embeddings (`str`, *optional*): which prefix tokens get a learned position of their own:
            `"cls"` (transformers' ViT and DINOv2: only the class token), `"all"` (DeiT's class and distillation
            tokens, timm's class and register tokens) or `"none"` (timm's `no_embed_class`, big_vision). Defaults to `"cls"` for
            learned positions with a class token and to `"none"` otherwise.
        use_fc_norm (`bool`, defaults to `False`): apply the final LayerNorm to the pooled vector instead of to
            every token (timm's `fc_norm`, the default of its `global_pool="avg"` models).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth (Huang et al. 2016) of the last layer; layer
            `i` drops its residual branches with probability `drop_path_rate * i / (num_hidden_layers - 1)`.
        layer_scale_init_value (`float`, *optional*): when set, LayerScale (Touvron et al. 2021, CaiT) multiplies
            each residual branch by a learned per-channel vector initialised to this value.
        qk_norm (`bool`, defaults to `False`): LayerNorm on queries and keys per head (Dehghani et al. 2023).
        dynamic_image_size (`bool`, defaults to `False`): accept any input size. Inputs whose sides are not
            multiples of the patch size are padded at the bottom/right, and the learned position table is
            resampled to the input's patch grid at run time.
        position_interpolation (`str`, defaults to `"bicubic_antialias"`): how a learned position table is resampled
            to another grid, at run time and by `set_image_size`: `"bicubic_antialias"` (timm's
            `resample_abs_pos_embed`, DINOv2 with registers) or `"bicubic"` (plain `F.interpolate`, transformers'
            ViT, DeiT and DINOv2 `interpolate_pos_encoding`). Converted checkpoints keep their source's choice, so
            they match it at every resolution.
        out_features (`list[str]`, *optional*): the stages `VitrailBackbone` returns as feature maps, named as in
            `stage_names`: `"stem"` (the embeddings), then `"stage1"` ... `"stage{num_hidden_layers}"` (each layer's
            output). Defaults to the last stage. transformers' backbone API, as in `Dinov2Config`.
        out_indices (`list[int]`, *optional*): the same stages by index into `stage_names` (negative ones count
            from the end); give either, the other follows.
        reshape_hidden_states (`bool`, defaults to `True`): `VitrailBackbone`'s feature maps are NCHW maps of the
            patch tokens; `False` gives each stage's whole token sequence `(batch, tokens, hidden_size)` instead,
            prefix tokens included (after the final LayerNorm when `apply_layernorm`), as `Dinov2Backbone` does
            for the heads that read tokens (DPT, Depth Anything, VitPose).
        apply_layernorm (`bool`, defaults to `True`): `VitrailBackbone` applies the final LayerNorm to its feature
            maps (as `Dinov2Backbone` does; with `use_fc_norm=True` that norm was trained on pooled vectors).
        norm_type (`str`, defaults to `"layernorm"`): the kind of every norm in the model (the layers', the final
            one, and those the options below add): `"layernorm"` or `"rmsnorm"` (`torch.nn.RMSNorm`, a weight and
            no bias, as in AIMv2). `layer_norm_eps` is the epsilon of each.
        patch_embedding_bias (`bool`, defaults to `True`): bias of the patch convolution (CLIP's has none).
        patch_embedding_norm (`bool`, defaults to `False`): a norm on the patch tokens right after the convolution,
            before positions are added (AIMv2, timm's `PatchEmbed(norm_layer=...)`).
        pre_norm (`bool`, defaults to `False`): a norm on the whole token sequence (prefix tokens and patches, with
            their positions) before the first layer (CLIP's `pre_layrnorm`, timm's `norm_pre`).
        final_norm (`bool`, defaults to `True`): the final norm after the last layer; `False` leaves it out (timm's
            `final_norm=False`), and needs `use_fc_norm=False`. `VitrailBackbone` then has no norm to apply.
        attention_norm (`bool`, defaults to `False`): a norm on the heads' concatenated output, before the attention's
            output projection (timm's `scale_attn_norm`, EVA-02's sub-LN).
        mlp_norm (`bool`, defaults to `False`): a norm on the MLP's hidden activations (after the activation, or the
            gating for SwiGLU), before `fc2` (timm's `scale_mlp_norm`, EVA-02's SwiGLU).
        proj_bias (`bool`, defaults to `True`): bias of the attention's output projection.
        mlp_bias (`bool`, defaults to `True`): biases of the MLP's `fc1` and `fc2`.
        map_intermediate_size (`int`, *optional*): with `pooling="map"`, the hidden width of the pooling head's
            MLP; defaults to `intermediate_size`.
        map_num_heads (`int`, *optional*): with `pooling="map"`, the pooling head's attention heads (Perception
            Encoder uses 8 whatever the model's); defaults to `num_attention_heads`; must divide `hidden_size`.
        key_bias (`bool`, defaults to `True`): with `qkv_bias=True`, False gives queries and values a bias but keys
            none (BEiT, EVA, DINOv3): `qkv` then has no bias of its own, and the biases are `q_bias` and `v_bias`.
        rope_type (`str`, defaults to `"none"`): 2D rotary position embeddings (Su et al. 2021; Heo et al. 2024,
            "Rotary Position Embedding for Vision Transformer"), applied to the queries and keys of the patch tokens
            in every layer (after `qk_norm`; prefix tokens are not rotated): `"none"`, `"axial"` (fixed frequencies;
            half of each head's `head_dim // 2` rotation slots turn with one coordinate, half with the other: EVA-02,
            DINOv3, Perception Encoder, timm's rope ViTs) or `"mixed"` (every head of every layer learns its own 2D
            frequencies, `attention.rope_freqs`: RoPE-Mixed). Both are computed for the input's patch grid.
        rope_theta (`float`, defaults to 10000.0): the frequency base: slot `i` of the `head_dim // 4` per axis
            turns at `rope_theta ** (-i / (head_dim // 4))` (EVA-02 10000, DINOv3 and RoPE-Axial 100); with
            `"mixed"`, the base the learned frequencies start from (RoPE-Mixed 10).
        rope_coordinates (`str`, defaults to `"index"`): the position of a patch: `"index"` (its row and column,
            plus `rope_offset`, EVA-02) or `"centered"` (its centre scaled to [-1, 1] along each axis, then times
            2 pi, DINOv3): the same range at every grid.
        rope_offset (`float`, defaults to 0.0): added to the patch index before any scaling (Perception Encoder 1).
        rope_reference_grid (`int` or `(rows, cols)`, *optional*): with `"index"` coordinates, scale them so that
            any grid spans this one's range (EVA-02 `ref_feat_shape`, the pretraining grid): a patch at row `r` of
            `R` rows is at `(r + rope_offset) / R * reference_rows`.
        rope_axis_order (`str`, defaults to `"yx"`): which coordinate comes first: `"yx"` (rows, timm's
            `grid_indexing="ij"`) or `"xy"` (columns, timm's `"xy"`: Perception Encoder, RoPE-ViT). With `"axial"`
            the first axis turns the first half of the frequency slots; with `"mixed"`, `rope_freqs[0]` multiplies it.
        rope_layout (`str`, defaults to `"interleaved"`): which channels rotate together: `"interleaved"` (pairs
            `(2i, 2i + 1)`, EVA-02, timm's default) or `"half"` (pairs `(i, i + head_dim / 2)`, DINOv3).
        rope_train_shift (`float`, *optional*): in training only, move the rotary coordinates of every forward
            pass by one random transform, as DINOv3 trains: first a shift drawn from [-shift, shift] per axis,
        rope_train_jitter (`float`, *optional*): then a scale per axis drawn log-uniformly from [1/jitter, jitter],
        rope_train_rescale (`float`, *optional*): then one scale for both axes drawn from [1/rescale, rescale].
        relative_position_bias (`str`, defaults to `"none"`): a learned bias added to the attention scores that
            depends on the offset between two patches: `"none"`, `"table"` (one entry per offset and head, plus
            three for the class token, BEiT; resampled bilinearly to other grids as transformers' BEiT does) or
            `"mlp"` (a two-layer ReLU MLP of the log-scaled offset, timm's relpos ViTs; prefix tokens get no bias).
        relative_position_bias_shared (`bool`, defaults to `False`): one bias for all layers
            (`encoder.relative_position_bias`) instead of one per layer (`attention.relative_position_bias`).
        relative_position_bias_hidden_size (`int`, defaults to 128): hidden width of the `"mlp"` bias.
        id2label (`dict[int, str]`, *optional*): class names by index; `num_labels` (the head's size) follows
            from it. Defaults to two classes, `LABEL_0` and `LABEL_1`.
        label2id (`dict[str, int]`, *optional*): the inverse of `id2label`.
        problem_type (`str`, *optional*): the loss of `VitrailForImageClassification`:
            `"single_label_classification"` (cross-entropy), `"multi_label_classification"` (binary cross-entropy
            per class) or `"regression"` (mean squared error); inferred from `num_labels` and the labels' dtype
            when unset.
        output_hidden_states (`bool`, defaults to `False`): return every layer's hidden states by default.
        return_dict (`bool`, defaults to `True`): return `ModelOutput`s rather than tuples.
        dtype (`str`, *optional*): the dtype the weights were saved in; `from_pretrained(dtype="auto")` loads it.
        architectures (`list[str]`, *optional*): the model classes this config was saved with.
        transformers_version (`str`, *optional*): the transformers release that saved the config.
        chunk_size_feed_forward (`int`, defaults to 0): transformers' feed-forward chunking; vitrail's layers
            do not read it.
        is_encoder_decoder (`bool`, defaults to `False`): transformers' flag for encoder-decoder models; vitrail's
            models are encoders and do not read it.

    Example:

    ```python
    >>> from vitrail import VitrailConfig, VitrailForImageClassification
    >>> config = VitrailConfig.from_variant("S/16", num_labels=10)
    >>> model = VitrailForImageClassification(config)
    ```
    """

    model_type = "vitrail"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    mlp_type: str = "mlp"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    pooling: str = "cls"
    use_cls_token: bool = True
    use_distillation_token: bool = False
    num_register_tokens: int = 0
    position_embedding_type: str = "learned"
    prefix_position_embeddings: str | None = None
    use_fc_norm: bool = False
    drop_path_rate: float | int = 0.0
    layer_scale_init_value: float | None = None
    qk_norm: bool = False
    dynamic_image_size: bool = False
    position_interpolation: str = "bicubic_antialias"
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    reshape_hidden_states: bool = True
    apply_layernorm: bool = True
    # Options of other ViT families (CLIP, SigLIP, EVA-02, AIMv2, ...); the defaults are the layout described above.
    norm_type: str = "layernorm"
    patch_embedding_bias: bool = True
    patch_embedding_norm: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    attention_norm: bool = False
    mlp_norm: bool = False
    proj_bias: bool = True
    mlp_bias: bool = True
    map_intermediate_size: int | None = None  # None: intermediate_size
    map_num_heads: int | None = None  # None: num_attention_heads
    # Positions inside attention: q/v-only biases, rotary embeddings, relative position biases.
    key_bias: bool = True
    rope_type: str = "none"
    rope_theta: float | int = 10000.0
    rope_coordinates: str = "index"
    rope_offset: float | int = 0.0
    rope_reference_grid: int | list[int] | tuple[int, int] | None = None
    rope_axis_order: str = "yx"
    rope_layout: str = "interleaved"
    rope_train_shift: float | int | None = None
    rope_train_jitter: float | int | None = None
    rope_train_rescale: float | int | None = None
    relative_position_bias: str = "none"
    relative_position_bias_shared: bool = False
    relative_position_bias_hidden_size: int = 128

    def __post_init__(self, **kwargs):
        if self.prefix_position_embeddings is None:
            learned_cls = self.position_embedding_type == "learned" and self.use_cls_token
            self.prefix_position_embeddings = "cls" if learned_cls else "none"
        self.set_output_features_output_indices(
            out_features=kwargs.pop("out_features", None), out_indices=kwargs.pop("out_indices", None)
        )
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """The fields, as transformers saves them; the backbone's stages only when they are not the default (the
        last), so that a config saved without choosing them keeps meaning "the last" at any depth."""
        output = super().to_dict()
        if output["out_features"] == self.stage_names[-1:]:
            del output["out_features"], output["out_indices"]
        return output

    # ---- derived values: computed here and nowhere else -------------------------------------------------------

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(rows, columns)` at `image_size` (padded up when sizes are dynamic)."""
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return -(-h // ph), -(-w // pw)

    @property
    def rope_reference_hw(self) -> tuple[int, int] | None:
        """`rope_reference_grid` as `(rows, cols)`, or None."""
        return None if self.rope_reference_grid is None else _pair(self.rope_reference_grid)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, the distillation token, then the registers."""
        return int(self.use_cls_token) + int(self.use_distillation_token) + self.num_register_tokens

    @property
    def num_prefix_positions(self) -> int:
        """Prefix tokens that own a row of the learned position table."""
        return {"cls": 1, "all": self.num_prefix_tokens, "none": 0}[self.prefix_position_embeddings]

    @property
    def stage_names(self) -> list[str]:
        """The stages a backbone can return: `"stem"` (the embeddings), then `"stage{i}"`, the output of layer i.
        Derived, so not saved; a config that carries them (as Dinov2's do) must agree."""
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]

    @stage_names.setter
    def stage_names(self, names: list[str]) -> None:
        if list(names) != self.stage_names:
            raise ValueError(
                f"`stage_names` {names} do not match the {self.num_hidden_layers} layers of this config, whose stages "
                f"are {self.stage_names}; leave `stage_names` out (they follow from `num_hidden_layers`)."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`, the vector the classification head reads."""
        return 2 * self.hidden_size if self.pooling == "cls_mean" else self.hidden_size

    # ---- construction from the size table ---------------------------------------------------------------------

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "VitrailConfig":
        """Build a config from a size name such as `"S/16"`, `"B/32"` or `"L/14"`; keyword arguments override.

        The patch size after the slash can be any positive integer.
        """
        name, _, patch = variant.partition("/")
        if name not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
            raise ValueError(
                f"Unknown variant {variant!r}: write '<size>/<patch>' with size one of {list(VARIANTS)} and a "
                "positive integer patch size, e.g. 'S/16' or 'L/14'."
            )
        width, depth, heads, mlp = VARIANTS[name]
        fields = {
            "hidden_size": width,
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "intermediate_size": mlp,
            "patch_size": int(patch),
            "encoder_stride": int(patch),
        }
        return cls(**{**fields, **overrides})

    # ---- validation (runs at construction and again in save_pretrained) ---------------------------------------

    def validate_architecture(self):
        # Validators run in name order, this one first: the later ones may rely on the choices being known.
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown `{name}` {getattr(self, name)!r}; choose one of {choices}.")
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
            "encoder_stride",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        # Imported here: transformers' activations import torch, which a config alone does not need.
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"Unknown `hidden_act` {self.hidden_act!r}; choose a key of `transformers.activations.ACT2FN`, "
                "e.g. 'gelu', 'gelu_pytorch_tanh', 'quick_gelu', 'relu' or 'silu'."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}) so that every head gets the same width; pick a head count that "
                f"divides {self.hidden_size}, or a multiple of {self.num_attention_heads} as width."
            )
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != 2:
                raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {value!r}.")
            if min(_pair(value)) <= 0:
                raise ValueError(f"`{name}` must be positive, got {value!r}.")
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        if not self.dynamic_image_size and (h % ph or w % pw):
            raise ValueError(
                f"`image_size` {h}x{w} is not divisible by `patch_size` {ph}x{pw}, so border pixels would be lost. "
                "Choose sizes that divide, or set `dynamic_image_size=True` to pad inputs up to whole patches."
            )

    def validate_tokens_and_pooling(self):
        if self.pooling in ("cls", "cls_mean") and not self.use_cls_token:
            raise ValueError(
                f"`pooling={self.pooling!r}` reads the class token, but `use_cls_token=False`. "
                "Set `use_cls_token=True` or use `pooling='mean'`."
            )
        if self.pooling == "cls_mean" and self.use_fc_norm:
            raise ValueError(
                "`pooling='cls_mean'` concatenates the class token and the patch mean into `2 * hidden_size` "
                "features, which the final LayerNorm (width `hidden_size`) cannot normalise as `use_fc_norm=True` "
                "asks; set `use_fc_norm=False` (the norm then applies to every token first, as in DINOv2) or pool "
                "with 'cls' or 'mean'."
            )
        if self.use_distillation_token and not self.use_cls_token:
            raise ValueError(
                "`use_distillation_token=True` places the distillation token after the class token (DeiT), but "
                "`use_cls_token=False`; enable the class token too."
            )
        if self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be >= 0, got {self.num_register_tokens}.")
        if self.position_embedding_type == "sincos2d" and self.hidden_size % 4:
            raise ValueError(
                f"`position_embedding_type='sincos2d'` splits channels into four sin/cos groups, so `hidden_size` "
                f"must be divisible by 4 (got {self.hidden_size})."
            )
        if self.prefix_position_embeddings != "none":
            if self.position_embedding_type != "learned":
                raise ValueError(
                    f"`prefix_position_embeddings={self.prefix_position_embeddings!r}` gives prefix tokens learned "
                    f"positions, which needs `position_embedding_type='learned'` (got "
                    f"{self.position_embedding_type!r}); set `prefix_position_embeddings='none'`."
                )
            if self.num_prefix_tokens == 0 or (
                self.prefix_position_embeddings == "cls" and not self.use_cls_token
            ):
                raise ValueError(
                    f"`prefix_position_embeddings={self.prefix_position_embeddings!r}` but the model has no such "
                    "prefix token; set it to 'none' or enable `use_cls_token`."
                )

    def validate_positions(self):
        rope_fields = {
            "rope_theta": 10000.0,
            "rope_coordinates": "index",
            "rope_offset": 0.0,
            "rope_reference_grid": None,
            "rope_axis_order": "yx",
            "rope_layout": "interleaved",
            "rope_train_shift": None,
            "rope_train_jitter": None,
            "rope_train_rescale": None,
        }
        if self.rope_type == "none":
            for name, default in rope_fields.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"`{name}={getattr(self, name)!r}` sets up rotary position embeddings, but `rope_type='none'` "
                        f"turns them off; set `rope_type` to 'axial' or 'mixed', or leave `{name}` at {default!r}."
                    )
        else:
            if self.head_dim % 4:
                raise ValueError(
                    f"`rope_type={self.rope_type!r}` rotates channel pairs for two axes, so the head width "
                    f"(`hidden_size / num_attention_heads` = {self.head_dim}) must be divisible by 4."
                )
            if not self.rope_theta > 0:
                raise ValueError(
                    f"`rope_theta` is the frequency base and must be positive, got {self.rope_theta}."
                )
            if self.rope_reference_grid is not None:
                grid = self.rope_reference_grid
                if not isinstance(grid, int) and len(grid) != 2:
                    raise ValueError(
                        f"`rope_reference_grid` must be an int or a (rows, cols) pair, got {grid!r}."
                    )
                if min(_pair(grid)) <= 0:
                    raise ValueError(f"`rope_reference_grid` must be positive, got {grid!r}.")
                if self.rope_coordinates != "index":
                    raise ValueError(
                        "`rope_reference_grid` rescales patch indices, but `rope_coordinates='centered'` already "
                        "spans [-1, 1] at every grid; leave `rope_reference_grid` unset."
                    )
            if self.rope_train_shift is not None and not 0 <= self.rope_train_shift < float("inf"):
                raise ValueError(
                    f"`rope_train_shift` must be a finite number >= 0, got {self.rope_train_shift}."
                )
            for name in ("rope_train_jitter", "rope_train_rescale"):
                value = getattr(self, name)
                if value is not None and not 1 <= value < float("inf"):
                    raise ValueError(
                        f"`{name}` is a scale factor: coordinates are scaled by a draw from [1/{name[11:]}, "
                        f"{name[11:]}], so it must be a finite number >= 1, got {value}."
                    )

        kind = self.relative_position_bias
        if kind == "none" and self.relative_position_bias_shared:
            raise ValueError(
                "`relative_position_bias_shared=True` shares a relative position bias that "
                "`relative_position_bias='none'` turns off; choose 'table' or 'mlp', or set it False."
            )
        if kind != "mlp" and self.relative_position_bias_hidden_size != 128:
            raise ValueError(
                f"`relative_position_bias_hidden_size` is the width of the 'mlp' relative position bias, but "
                f"`relative_position_bias={kind!r}`; leave it at 128."
            )
        if kind == "mlp" and self.relative_position_bias_hidden_size <= 0:
            raise ValueError(
                "`relative_position_bias_hidden_size` must be a positive integer, got "
                f"{self.relative_position_bias_hidden_size}."
            )
        if kind == "table" and self.num_prefix_tokens != int(self.use_cls_token):
            raise ValueError(
                "`relative_position_bias='table'` has entries for the class token only (BEiT), but the model also "
                "has a distillation token or register tokens; remove them or use `relative_position_bias='mlp'`, "
                "which gives every prefix token no bias."
            )

    def validate_labels(self):
        # `num_labels` is `len(id2label)` and the head's outputs are numbered 0..num_labels-1: other keys would
        # leave an output without a name (a KeyError in predictions) and a name without an output.
        ids = sorted(self.id2label or {})
        if ids != list(range(len(ids))):
            raise ValueError(
                f"`id2label` must number the classes 0..{len(ids) - 1} (one per output of the head), got ids "
                f"{ids[:10]}{' ...' if len(ids) > 10 else ''}; renumber them from 0 without gaps."
            )
        problem_types = ("regression", "single_label_classification", "multi_label_classification")
        if self.problem_type is not None and self.problem_type not in problem_types:
            raise ValueError(
                f"Unknown `problem_type` {self.problem_type!r}; choose one of {problem_types}, or leave it unset to "
                "infer it from the labels."
            )

    def validate_regularisation(self):
        # Every comparison below fails for NaN, so NaN is refused with the rest.
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` is a probability in [0, 1), got {value}.")
        if self.layer_scale_init_value is not None and not 0.0 < self.layer_scale_init_value < math.inf:
            raise ValueError(
                "`layer_scale_init_value` must be a positive finite number (e.g. 1e-5; or None to disable "
                f"LayerScale), got {self.layer_scale_init_value}."
            )
        if not 0.0 < self.layer_norm_eps < math.inf:
            raise ValueError(
                "`layer_norm_eps` is added to the variance before dividing by its square root, so it must be a "
                f"positive finite number (1e-12 or 1e-6 are usual), got {self.layer_norm_eps}; zero or a negative "
                "value gives NaN outputs."
            )
        if not 0.0 < self.initializer_range < math.inf:
            raise ValueError(
                "`initializer_range` is the standard deviation of the initial weights, so it must be a positive "
                f"finite number (0.02 is usual), got {self.initializer_range}."
            )

    def validate_layout_options(self):
        if not self.final_norm and self.use_fc_norm:
            raise ValueError(
                "`use_fc_norm=True` applies the final norm to the pooled vector, but `final_norm=False` removes that "
                "norm; set `final_norm=True`, or `use_fc_norm=False` for a model without a final norm."
            )
        for name in ("map_intermediate_size", "map_num_heads"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.pooling != "map":
                raise ValueError(
                    f"`{name}={value}` sizes the attention-pooling head, which only `pooling='map'` builds (got "
                    f"`pooling={self.pooling!r}`); set `{name}=None` or `pooling='map'`."
                )
            if value <= 0:
                raise ValueError(
                    f"`{name}` must be a positive integer (or None for the default), got {value}."
                )
        if self.map_num_heads is not None and self.hidden_size % self.map_num_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `map_num_heads` ({self.map_num_heads}) so "
                "that every head of the attention-pooling head gets the same width; pick a head count that divides "
                f"{self.hidden_size}."
            )


# Checkpoints carry this file and name it in `auto_map`, so they open where vitrail is not installed.
VitrailConfig.register_for_auto_class()

__all__ = ["VitrailConfig", "VARIANTS"]
