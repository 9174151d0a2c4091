"""Loading: one-way imports, what `from_pretrained` refuses (and where it runs), and one rule for positions.

"package" runs `from_pretrained` as an installed vitrail does (`vitrail.loading.load_pretrained`); "hub-carried"
runs the same classes without that loader, which is what the copy of `modeling_vitrail.py` that travels with a
checkpoint does (a process without vitrail, below, checks the Auto-class path for real).
"""

import ast
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification, pipeline

import vitrail
from vitrail import (
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailImageProcessor,
    VitrailModel,
    VitrailPreTrainedModel,
)
from vitrail.hub import CheckpointError, check_checkpoint

from .conftest import randomise, run_without_vitrail, tiny_config

SRC = Path(vitrail.__file__).parent
TRAVELLING = ("configuration_vitrail", "modeling_vitrail", "image_processing_vitrail")


def classifier_folder(folder: Path, **overrides) -> Path:
    randomise(VitrailForImageClassification(tiny_config(num_labels=5, **overrides))).save_pretrained(folder)
    return folder


def hf_folder(folder: Path) -> Path:
    config = ViTConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_labels=5)  # fmt: skip
    randomise(ViTForImageClassification(config)).save_pretrained(folder)
    return folder


def edit_weights(folder: Path, change) -> None:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    change(state)
    save_file(state, weights, metadata={"format": "pt"})


def edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(params=["package", "hub-carried"])
def code(request, monkeypatch) -> str:
    if request.param == "hub-carried":
        monkeypatch.setattr(VitrailPreTrainedModel, "pretrained_loader", None)
    return request.param


@pytest.fixture
def transformers_warnings(monkeypatch, caplog):
    """transformers' loggers do not propagate to pytest's handler by default, and another test may have lowered
    their level: warnings on, for this test only."""
    root = logging.getLogger("transformers")
    monkeypatch.setattr(root, "propagate", True)
    level = root.level
    root.setLevel(logging.WARNING)  # setLevel, not the attribute: child loggers cache their effective level
    caplog.set_level(logging.WARNING)
    yield caplog
    root.setLevel(level)


# ---- one-way imports -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", TRAVELLING)
def test_files_that_travel_import_nothing_else_of_vitrail(module):
    """The three files copied into every checkpoint import only the standard library, torch, numpy, PIL,
    transformers, huggingface_hub and each other, at any depth (an import inside a function counts)."""
    allowed = {"torch", "numpy", "PIL", "transformers", "huggingface_hub", *sys.stdlib_module_names}
    for node in ast.walk(ast.parse((SRC / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in TRAVELLING, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] in allowed, ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] in allowed for alias in node.names), ast.unparse(node)


# ---- weight files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("source", ["vitrail", "transformers"])
def test_unreadable_weights_are_named(damage, source, tmp_path):
    folder = (classifier_folder if source == "vitrail" else hf_folder)(tmp_path / source)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(
        OSError, match=re.escape(str(weights)) + r" cannot be read .*truncated, empty or damaged"
    ):
        VitrailForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize("source", ["vitrail", "transformers", "vitrail-pickle"])
def test_non_float_weights_are_refused_by_name(source, tmp_path):
    """transformers would cast an integer tensor to float and load it without a word."""
    folder = (hf_folder if source == "transformers" else classifier_folder)(tmp_path / source)
    name = "vit.layernorm.weight" if source == "transformers" else "vitrail.layernorm.weight"
    edit_weights(folder, lambda state: state.update({name: torch.ones(32, dtype=torch.int64)}))
    kwargs = {}
    if source == "vitrail-pickle":
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        kwargs["allow_pickle"] = True
    with pytest.raises(ValueError, match=rf"1 tensor\(s\) that are not floating point.*'{re.escape(name)}'"):
        VitrailForImageClassification.from_pretrained(folder, **kwargs)


# ---- what the loaded weights must be ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(value, code, tmp_path):
    folder = classifier_folder(tmp_path)
    name = "vitrail.encoder.layers.1.mlp.fc2.bias"
    edit_weights(folder, lambda state: state[name].__setitem__(3, value))
    with pytest.raises(ValueError, match=rf"not finite \(NaN or inf\) in {re.escape(name)}\b.*predict NaN"):
        VitrailForImageClassification.from_pretrained(folder)


def test_the_pipeline_refuses_nan_weights_instead_of_answering_nan(tmp_path):
    folder = classifier_folder(tmp_path)
    VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
    edit_weights(folder, lambda state: state["vitrail.layernorm.bias"].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) in vitrail\.layernorm\.bias"):
        pipeline("image-classification", model=str(folder))


def test_non_finite_converted_weights_are_refused_by_name(tmp_path):
    folder = hf_folder(tmp_path)
    edit_weights(folder, lambda state: state["vit.layernorm.bias"].fill_(float("inf")))
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) in vitrail\.layernorm\.bias"):
        VitrailForImageClassification.from_pretrained(folder)


def test_a_config_with_more_layers_than_the_weights_is_refused(code, tmp_path):
    """transformers would build the third layer at random and warn; the missing tensors are named instead."""
    folder = classifier_folder(tmp_path)
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"lacks .*vitrail\.encoder\.layers\.2\.attention\.qkv\.weight"):
        VitrailForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize("name", ["vitrail.encoder.layers.0.mlp.fc1.bias", "vitrail.embeddings.cls_token",
                                  "classifier.bias"])  # fmt: skip
def test_a_missing_tensor_is_refused(name, code, tmp_path):
    """A head that is only partly there is damage too: only a head absent as a whole is new by design."""
    folder = classifier_folder(tmp_path)
    edit_weights(folder, lambda state: state.pop(name))
    with pytest.raises(ValueError, match=rf"lacks {re.escape(name)} and holds no tensor"):
        VitrailForImageClassification.from_pretrained(folder)


def test_tensors_the_config_does_not_build_are_refused(code, tmp_path):
    """Weights with more layers than the config (or any unknown tensor) would be dropped: refused by name."""
    folder = classifier_folder(tmp_path, num_hidden_layers=3)
    edit_config(folder, num_hidden_layers=2)
    edit_weights(folder, lambda state: state.update(stray=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"lacks no tensor and holds stray, vitrail\.encoder\.layers\.2\."):
        VitrailForImageClassification.from_pretrained(folder)


def test_heads_may_be_absent_or_left_out(code, tmp_path, transformers_warnings):
    """A backbone checkpoint opens in a head class (a new head, with a warning), a classifier in the backbone class
    or the masked-image-modeling class (its head left out), and a pretraining checkpoint in the classifier."""
    randomise(VitrailModel(tiny_config())).save_pretrained(tmp_path / "backbone")
    classifier_folder(tmp_path / "classifier")
    randomise(VitrailForMaskedImageModeling(tiny_config())).save_pretrained(tmp_path / "mim")
    head = VitrailForImageClassification.from_pretrained(tmp_path / "backbone", num_labels=3)
    assert "classifier.weight" in transformers_warnings.text and "MISSING" in transformers_warnings.text
    reference = VitrailModel.from_pretrained(tmp_path / "backbone").state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in head.vitrail.state_dict().items())
    for cls, folder in [(VitrailModel, "classifier"), (VitrailForMaskedImageModeling, "classifier"),
                        (VitrailForImageClassification, "mim"), (VitrailModel, "mim")]:  # fmt: skip
        assert isinstance(cls.from_pretrained(tmp_path / folder), cls)


def test_hub_carried_code_leaves_image_size_to_transformers_and_resamples_after_loading(
    tmp_path, monkeypatch
):
    """Without the package, `image_size=` is plain transformers (a shape mismatch, refused); `set_image_size`, which
    travels with the model, resamples after loading, as the package does on the way in."""
    folder = classifier_folder(tmp_path)
    package = VitrailForImageClassification.from_pretrained(folder, image_size=40)
    monkeypatch.setattr(VitrailPreTrainedModel, "pretrained_loader", None)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        VitrailForImageClassification.from_pretrained(folder, image_size=40)
    model = VitrailForImageClassification.from_pretrained(folder)
    model.set_image_size(40)
    assert torch.equal(
        model.vitrail.embeddings.position_embeddings, package.vitrail.embeddings.position_embeddings
    )


# ---- ignore_mismatched_sizes and the other arguments of transformers ---------------------------------------------


@pytest.mark.parametrize("source", ["vitrail", "transformers"])
def test_ignore_mismatched_sizes_reinitialises_what_the_config_resizes(source, tmp_path, caplog):
    """`pooling="cls_mean"` widens the head's input: refused without the flag, a new head with it, on both paths
    (the flag was dropped unread on converted checkpoints)."""
    folder = (classifier_folder if source == "vitrail" else hf_folder)(tmp_path)
    native = VitrailForImageClassification.from_pretrained(folder)
    with pytest.raises((ValueError, RuntimeError), match=r"classifier\.weight|ignore_mismatched_sizes"):
        VitrailForImageClassification.from_pretrained(folder, pooling="cls_mean")
    with caplog.at_level(logging.WARNING):
        model = VitrailForImageClassification.from_pretrained(
            folder, pooling="cls_mean", ignore_mismatched_sizes=True
        )
    assert model.classifier.weight.shape == (5, 64)
    assert all(
        torch.equal(t, native.vitrail.state_dict()[name]) for name, t in model.vitrail.state_dict().items()
    )
    if source == "transformers":
        assert "classifier.weight newly initialised" in caplog.text  # the bias keeps its shape, and is kept


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_safetensors": False}, "allow_pickle=True"),
        ({"weights_only": False}, "`weights_only=True` only"),
    ],
)
def test_converted_checkpoints_refuse_what_they_cannot_honour(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        VitrailForImageClassification.from_pretrained(hf_folder(tmp_path), **kwargs)


# ---- positions: one rule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position_interpolation": "bicubic"},
        {"position_embedding_type": "sincos2d"},
        {"prefix_position_embeddings": "none"},
    ],  # fmt: skip
)
def test_set_image_size_stores_the_positions_the_model_uses_at_run_time(options):
    """A model made native at 20x26 px has the positions, and so the outputs, that the dynamic-size model
    computes for 20x26 inputs at run time: one rule decides both."""
    dynamic = randomise(VitrailModel(tiny_config(dynamic_image_size=True, **options)))
    resized = randomise(VitrailModel(tiny_config(**options)))
    resized.set_image_size((20, 26))
    pixels = torch.randn(2, 3, 20, 26, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dynamic.embeddings.patch_positions((10, 13), torch.float32)
        torch.testing.assert_close(
            resized.embeddings.patch_positions((10, 13), torch.float32), want, atol=0, rtol=0
        )
        torch.testing.assert_close(resized(pixels).last_hidden_state, dynamic(pixels).last_hidden_state)


# ---- code that travels: the module cache -----------------------------------------------------------------------


def twin_folders(root: Path, change: str) -> tuple[Path, Path]:
    """Two complete checkpoints in folders of the same name, `a/ckpt` and `b/ckpt`, whose copies of the code file
    `change` differ. b's `modeling_vitrail.py` fails every forward pass, so running it is visible."""
    folders = []
    for tag in ("a", "b"):
        folder = classifier_folder(root / tag / "ckpt")
        VitrailImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
        folders.append(folder)
    code = folders[1] / change
    text = code.read_text().replace(
        "        if pixel_values is None:\n",
        "        raise RuntimeError('b code ran')\n        if pixel_values is None:\n",
    )
    code.write_text(text + "\n# b's own copy\n")
    return folders[0], folders[1]


def test_check_checkpoint_runs_each_folders_own_code(tmp_path):
    """Two same-named folders in one process: the second is checked with its own (failing) code."""
    a, b = twin_folders(tmp_path, "modeling_vitrail.py")
    check_checkpoint(a)
    with pytest.raises(CheckpointError, match="b code ran"):
        check_checkpoint(b)
    # The installed package's classes load any vitrail folder, whatever code the folder carries.
    assert isinstance(VitrailForImageClassification.from_pretrained(b), VitrailForImageClassification)


def test_check_checkpoint_refuses_code_cached_for_another_folder(tmp_path, monkeypatch):
    """Where transformers' module cache hands back what it loaded for a same-named folder (transformers 5.0 keys a
    local folder's code by its name only), the check refuses instead of checking the wrong code."""
    from transformers import dynamic_module_utils

    a, b = twin_folders(tmp_path, "configuration_vitrail.py")
    original = dynamic_module_utils.get_class_from_dynamic_module
    stale = lambda reference, folder, **kw: original(reference, str(a), **kw)  # noqa: E731
    check_checkpoint(a)
    monkeypatch.setattr(dynamic_module_utils, "get_class_from_dynamic_module", stale)
    with pytest.raises(
        CheckpointError, match=r"gave for \['configuration_vitrail.py'\] is not the folder's own"
    ):
        check_checkpoint(b)


AUTO_TWINS = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from transformers import AutoModelForImageClassification
    a, b, report = sys.argv[1:4]
    AutoModelForImageClassification.from_pretrained(a, trust_remote_code=True)
    try:
        AutoModelForImageClassification.from_pretrained(b, trust_remote_code=True)
        outcome = "loaded b"
    except ImportError as error:
        outcome = f"refused b: {error}"
    Path(report).write_text(json.dumps({"outcome": outcome}))
    """
)


def test_auto_classes_never_run_a_same_named_folders_code(tmp_path):
    """transformers' Auto classes give b/ckpt the model class they made for a/ckpt (same name, same configuration
    code): the Hub-carried `from_pretrained` refuses instead of loading b with a's code."""
    a, b = twin_folders(tmp_path, "modeling_vitrail.py")
    env = dict(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    report = run_without_vitrail(AUTO_TWINS, a, b, root=tmp_path, env=env)
    assert f"refused b: {b / 'modeling_vitrail.py'} differs from the code of this class" in report["outcome"]
