"""VitrailBackbone: transformers' backbone API (feature maps of chosen stages, NCHW, prefix tokens split off),
early stopping, any input size, loading any vitrail checkpoint, `AutoBackbone` with and without vitrail, and a
transformers dense-prediction model built on it."""

import json
import textwrap

import pytest
import torch
from huggingface_hub.errors import HFValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from vitrail import (
    VitrailBackbone,
    VitrailConfig,
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailModel,
    VitrailPreTrainedModel,
)

from .conftest import randomise, run_without_vitrail, tiny_config
from .hub_server import USER, client_env, patch_client, serve

# Non-square (15 x 10 patches) with four prefix tokens: class, distillation, two registers.
OPTIONS = dict(num_hidden_layers=4, image_size=(30, 20), use_distillation_token=True, num_register_tokens=2)
PREFIX, ROWS, COLS, WIDTH = 4, 15, 10, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A classifier, a masked-image-modeling model and a bare model, saved, plus inputs."""
    root = tmp_path_factory.mktemp("backbone")
    made = {"root": root, "pixels": torch.randn(2, 3, 30, 20, generator=torch.Generator().manual_seed(1))}
    for name, cls in (
        ("classifier", VitrailForImageClassification),
        ("mim", VitrailForMaskedImageModeling),
        ("bare", VitrailModel),
    ):
        model = randomise(cls(tiny_config(num_labels=3, **OPTIONS)), seed=len(made))
        model.save_pretrained(root / name)
        made[name] = model
    return made


def expected_maps(
    model: VitrailModel, pixels, stages, norm=True, grid=(ROWS, COLS), **kwargs
) -> list[torch.Tensor]:
    """Feature maps recomputed from `VitrailModel`'s hidden states: final norm, prefix dropped, token
    `r * cols + c` at `[:, :, r, c]`."""
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True, **kwargs).hidden_states
    maps = []
    for stage in stages:
        tokens = model.layernorm(hidden[stage]) if norm else hidden[stage]
        patches = tokens[:, model.config.num_prefix_tokens :]
        maps.append(patches.reshape(len(pixels), *grid, -1).permute(0, 3, 1, 2))
    return maps


def test_feature_maps_are_the_normed_patch_tokens_in_nchw(folders):
    backbone = VitrailBackbone.from_pretrained(folders["root"] / "classifier", out_indices=[0, 2, -1]).eval()
    assert backbone.out_features == ["stem", "stage2", "stage4"] and backbone.out_indices == [0, 2, -1]
    assert backbone.channels == [WIDTH] * 3
    with torch.no_grad():
        out = backbone(folders["pixels"])
    assert out.hidden_states is None and out.attentions is None
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, WIDTH, ROWS, COLS)] * 3
    reference = folders["classifier"].vitrail
    for got, want in zip(
        out.feature_maps, expected_maps(reference, folders["pixels"], [0, 2, 4]), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # One position by hand: the patch in row 3, column 7 is token PREFIX + 3 * COLS + 7 of the last layer.
    with torch.no_grad():
        tokens = reference(folders["pixels"]).last_hidden_state
    torch.testing.assert_close(
        out.feature_maps[-1][:, :, 3, 7], tokens[:, PREFIX + 3 * COLS + 7], atol=1e-6, rtol=0
    )


def test_the_final_norm_is_optional(folders):
    backbone = VitrailBackbone.from_pretrained(
        folders["root"] / "bare", out_features=["stage1", "stage3"], apply_layernorm=False
    ).eval()
    assert backbone.out_indices == [1, 3]
    with torch.no_grad():
        maps = backbone(folders["pixels"]).feature_maps
    want = expected_maps(folders["bare"], folders["pixels"], [1, 3], norm=False)
    for got, expected in zip(maps, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "out_indices, kwargs, ran",
    [
        ([1], {}, [0]),
        ([0], {}, []),
        ([0, 2], {}, [0, 1]),
        ([1], {"output_hidden_states": [3]}, [0, 1, 2]),
        ([1], {"output_attentions": [-1]}, [0, 1, 2, 3]),
        ([1], {"output_hidden_states": True}, [0, 1, 2, 3]),
    ],
)
def test_it_stops_after_the_last_layer_an_output_needs(folders, out_indices, kwargs, ran):
    backbone = VitrailBackbone.from_pretrained(folders["root"] / "bare", out_indices=out_indices).eval()
    calls = []
    for index, layer in enumerate(backbone.encoder.layers):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    with torch.no_grad():
        out = backbone(folders["pixels"], **kwargs)
    assert calls == ran
    if "output_hidden_states" in kwargs:  # as many entries as there are hidden states, None where not chosen
        assert len(out.hidden_states) == 5
        assert sum(h is not None for h in out.hidden_states) == (
            5 if kwargs["output_hidden_states"] is True else 1
        )
    if "output_attentions" in kwargs:
        assert [a is None for a in out.attentions] == [True, True, True, False]


def test_any_input_size(folders):
    """Dynamic sizes are padded to whole patches (31 x 17 -> 16 x 9 patches); a static model takes another size
    per call with `interpolate_pos_encoding=True`, as `VitrailModel` does."""
    model = folders["bare"]
    backbone = VitrailBackbone.from_pretrained(folders["root"] / "bare", out_indices=[2]).eval()
    pixels = torch.randn(2, 3, 31, 17)
    with pytest.raises(ValueError, match="does not match the model's 30x20"):
        backbone(pixels)
    with torch.no_grad():
        got = backbone(pixels, interpolate_pos_encoding=True).feature_maps[0]
    (want,) = expected_maps(model, pixels, [2], interpolate_pos_encoding=True, grid=(16, 9))
    assert got.shape == (2, WIDTH, 16, 9)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    dynamic = VitrailBackbone(tiny_config(**OPTIONS, dynamic_image_size=True, out_indices=[2]))
    dynamic.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dynamic.eval()(pixels).feature_maps[0], want, atol=1e-6, rtol=0)


@pytest.fixture(params=["package", "hub-carried"])
def code(request, monkeypatch) -> str:
    """`from_pretrained` as installed vitrail runs it, or as the modeling file that travels with a checkpoint."""
    if request.param == "hub-carried":
        monkeypatch.setattr(VitrailPreTrainedModel, "pretrained_loader", None)
    return request.param


@pytest.mark.parametrize(
    "name, left_out",
    [
        ("classifier", {"classifier.weight", "classifier.bias", "distillation_classifier.weight",
                        "distillation_classifier.bias"}),
        ("mim", {"vitrail.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"}),
        ("bare", set()),
    ],
)  # fmt: skip
def test_every_vitrail_checkpoint_loads_into_the_backbone(folders, code, name, left_out):
    """Nothing missing; only the head's parts are left out (the strict loading's rule for heads)."""
    backbone, info = VitrailBackbone.from_pretrained(
        folders["root"] / name, out_indices=[-1], output_loading_info=True
    )
    assert set(info["missing_keys"]) == set() and set(info["unexpected_keys"]) == left_out
    reference = folders[name] if name == "bare" else folders[name].vitrail
    with torch.no_grad():
        got = backbone.eval()(folders["pixels"]).feature_maps[0]
    torch.testing.assert_close(got, expected_maps(reference, folders["pixels"], [4])[0], atol=1e-6, rtol=0)


def test_a_stray_tensor_is_still_refused(folders, code, tmp_path):
    folder = tmp_path / "stray"
    folders["bare"].save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    save_file({**state, "stray": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds stray that the config does not build"):
        VitrailBackbone.from_pretrained(folder)


def test_stages_in_the_config(tmp_path):
    """transformers' `BackboneConfigMixin`: names and indices follow each other; the default (the last stage) is
    not saved, so it stays the last at any depth; chosen stages are saved; bad ones are refused."""
    config = tiny_config()
    assert config.stage_names == ["stem", "stage1", "stage2"]
    assert (config.out_features, config.out_indices) == (["stage2"], [2])
    config.save_pretrained(tmp_path / "default")
    saved = json.loads((tmp_path / "default" / "config.json").read_text())
    assert "out_indices" not in saved and "out_features" not in saved and "stage_names" not in saved
    (tmp_path / "default" / "config.json").write_text(json.dumps({**saved, "num_hidden_layers": 3}))
    assert VitrailConfig.from_pretrained(tmp_path / "default").out_features == ["stage3"]

    chosen = tiny_config(out_indices=[0, -1])
    assert chosen.out_features == ["stem", "stage2"]
    chosen.save_pretrained(tmp_path / "chosen")
    assert VitrailConfig.from_pretrained(tmp_path / "chosen").out_indices == [0, -1]
    assert VitrailConfig.from_pretrained(tmp_path / "chosen", out_indices=[1]).out_features == ["stage1"]

    with pytest.raises(ValueError, match="out_indices must be valid indices for stage_names"):
        tiny_config(out_indices=[3])
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        tiny_config(out_features=["stage7"])
    with pytest.raises(ValueError, match=r"`stage_names` \['stem'\] do not match the 2 layers"):
        tiny_config(stage_names=["stem"])


def test_a_transformers_dense_model_runs_on_it():
    """UperNet (semantic segmentation) builds its backbone through `AutoBackbone.from_config` from a vitrail
    config, and trains: the loss reaches the backbone's first layer."""
    backbone_config = tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4])
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=3, hidden_size=16, use_auxiliary_head=False
    )
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone) is VitrailBackbone
    pixels = torch.randn(2, 3, 30, 30)
    out = model(pixels, labels=torch.randint(0, 3, (2, 30, 30)))
    assert out.logits.shape == (2, 3, 30, 30)
    out.loss.backward()
    assert model.backbone.encoder.layers[0].attention.qkv.weight.grad.abs().sum() > 0


def test_transformers_5_24_auto_backbone_misses_local_folders(folders):
    """transformers 5.24's `AutoBackbone.from_pretrained` asks the Hub whether the name is a repo before it looks
    on disk, so no local folder opens with it, vitrail's or any other model's (the README gives the ways around).
    If this fails, transformers has fixed it: drop the README's note."""
    with pytest.raises(HFValidationError, match="Repo id must"):
        AutoBackbone.from_pretrained(str(folders["root"] / "classifier"), out_indices=[-1])


@pytest.fixture(scope="module")
def hub_repo(folders):
    """The classifier folder as a repo on the loopback Hub server."""
    with serve() as server:
        repo_id = f"{USER}/vit-backbone"
        server.create_repo(repo_id, private=False)
        folder = folders["root"] / "classifier"
        server.put(repo_id, {path.name: path.read_bytes() for path in folder.iterdir()})
        yield server, repo_id


def test_auto_backbone_from_the_hub_with_vitrail(folders, hub_repo, monkeypatch, tmp_path):
    server, repo_id = hub_repo
    patch_client(monkeypatch, server, tmp_path / "hf_home")
    backbone = AutoBackbone.from_pretrained(repo_id, out_indices=[1, -1]).eval()
    assert type(backbone) is VitrailBackbone
    with torch.no_grad():
        maps = backbone(folders["pixels"]).feature_maps
    for got, want in zip(
        maps, expected_maps(folders["classifier"].vitrail, folders["pixels"], [1, 4]), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


REMOTE = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from transformers import AutoBackbone, AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    repo_id, folder, references, report_path = sys.argv[1:]
    ref = load_file(references)
    report = {}

    def max_diffs(maps, names):
        return [float((m - ref[name]).abs().max()) for m, name in zip(maps, names, strict=True)]

    backbone = AutoBackbone.from_pretrained(repo_id, out_indices=[1, -1], trust_remote_code=True).eval()
    report["class"] = [type(backbone).__module__, type(backbone).__name__]
    report["out_features"] = backbone.out_features
    ran = []
    for index, layer in enumerate(backbone.encoder.layers):
        layer.register_forward_hook(lambda *_, index=index: ran.append(index))
    with torch.no_grad():
        report["hub_diffs"] = max_diffs(backbone(ref["pixels"]).feature_maps, ["stage1", "stage4"])
        ran.clear()
        backbone.config.out_indices = [2]
        report["stage2_diff"] = max_diffs(backbone(ref["pixels"]).feature_maps, ["stage2"])
        report["layers_run"] = list(ran)

    # A local folder: transformers 5.24's AutoBackbone cannot open one; the folder's own class can.
    local_class = get_class_from_dynamic_module("modeling_vitrail.VitrailBackbone", folder)
    local = local_class.from_pretrained(folder, out_indices=[1, -1]).eval()
    report["local_class"] = [local_class.__module__, local_class.__name__]
    with torch.no_grad():
        report["local_diffs"] = max_diffs(local(ref["pixels"]).feature_maps, ["stage1", "stage4"])

    # Chosen-layer outputs in the Hub-carried code: eager only in the chosen layer, sdpa in the others.
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
    fused, calls = torch.nn.functional.scaled_dot_product_attention, []
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or fused(*a, **k)
    with torch.no_grad():
        out = model(ref["pixels"], output_attentions=[-1], output_hidden_states=[0, -1])
    report["implementation"] = model.config._attn_implementation
    report["sdpa_calls"] = len(calls)
    report["attentions_none"] = [a is None for a in out.attentions]
    report["attention_diff"] = float((out.attentions[-1] - ref["attention3"]).abs().max())
    report["hidden_none"] = [h is None for h in out.hidden_states]
    report["hidden_diffs"] = [float((out.hidden_states[i] - ref[f"hidden{i}"]).abs().max()) for i in (0, 4)]
    Path(report_path).write_text(json.dumps(report))
    """
)


def test_auto_backbone_and_chosen_outputs_without_vitrail(folders, hub_repo, tmp_path):
    """Where vitrail is not installed, the Hub-carried code gives the same feature maps through `AutoBackbone`
    (stopping early there too), through the folder's own class for a local folder, and chosen-layer outputs with
    eager attention in the chosen layer only."""
    server, repo_id = hub_repo
    reference = folders["classifier"].vitrail
    pixels = folders["pixels"]
    with torch.no_grad():
        eager = VitrailModel.from_pretrained(
            folders["root"] / "classifier", attn_implementation="eager"
        ).eval()
        full = eager(pixels, output_attentions=True, output_hidden_states=True)
    maps = expected_maps(reference, pixels, [1, 2, 4])
    tensors = {"pixels": pixels, "stage1": maps[0], "stage2": maps[1], "stage4": maps[2]}
    tensors.update(
        attention3=full.attentions[3], hidden0=full.hidden_states[0], hidden4=full.hidden_states[4]
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "references.safetensors")

    env = client_env(server, tmp_path / "hf_home")
    folder = folders["root"] / "classifier"
    report = run_without_vitrail(
        REMOTE, repo_id, folder, tmp_path / "references.safetensors", root=tmp_path, env=env
    )
    assert report["class"][1] == "VitrailBackbone" and report["class"][0].startswith("transformers_modules.")
    assert report["local_class"][1] == "VitrailBackbone" and report["local_class"][0].startswith(
        "transformers_"
    )
    assert report["out_features"] == ["stage1", "stage4"]
    assert max(report["hub_diffs"] + report["stage2_diff"] + report["local_diffs"]) <= 1e-6
    assert report["layers_run"] == [0, 1]
    assert report["implementation"] == "sdpa" and report["sdpa_calls"] == 3
    assert report["attentions_none"] == [True, True, True, False] and report["attention_diff"] <= 1e-6
    assert report["hidden_none"] == [False, True, True, True, False] and max(report["hidden_diffs"]) <= 1e-5
