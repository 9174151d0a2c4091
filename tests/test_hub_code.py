"""The Hub-code path: a saved vitrail folder opens with `trust_remote_code=True` where vitrail is absent.

One subprocess, with `vitrail` blocked in `sys.modules`, loads the folder through the Auto classes and
pipelines and reports what it got; the tests compare that report with references computed with vitrail.
"""

import builtins
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedImageModeling, pipeline

from vitrail import (
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailImageProcessor,
)

from .conftest import randomise, run_without_vitrail, tiny_config

ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}
CODE_FILES = ("configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py")
ATOL = 1e-6


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A classifier folder (with its processor), a masked-image-modeling folder, a PNG and references."""
    root = tmp_path_factory.mktemp("hub_code")
    classifier = randomise(
        VitrailForImageClassification(
            tiny_config(num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
        ),
        seed=0,
    )
    classifier.save_pretrained(root / "classifier")
    processor = VitrailImageProcessor(size={"height": 30, "width": 30})
    processor.save_pretrained(root / "classifier")
    mim = randomise(VitrailForMaskedImageModeling(tiny_config()), seed=1)
    mim.save_pretrained(root / "mim")
    # The classifier with only pickled weights, as older tools write them: refused unless allow_pickle=True.
    shutil.copytree(root / "classifier", root / "pickled")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save(classifier.state_dict(), root / "pickled" / "pytorch_model.bin")
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    ).save_pretrained(root / "hf_vit")

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    image.save(root / "image.png")
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 3, 30, 30, generator=generator)
    bool_masked_pos = torch.rand(2, 225, generator=generator) < 0.4
    with torch.no_grad():
        image_pixels = processor(image, return_tensors="pt")["pixel_values"]
        image_backbone = classifier.vitrail(image_pixels)
        reconstruction = mim(inputs, bool_masked_pos=bool_masked_pos)
        reference = {
            "inputs": inputs,
            "logits": classifier(inputs).logits,
            "pooler_output": classifier.vitrail(inputs).pooler_output,
            "image_pixel_values": image_pixels,
            "image_probabilities": classifier(image_pixels).logits.softmax(-1)[0],
            "image_hidden_state": image_backbone.last_hidden_state,
            "image_pooler_output": image_backbone.pooler_output,
            "bool_masked_pos": bool_masked_pos,
            "reconstruction": reconstruction.reconstruction,
            "mim_loss": reconstruction.loss,
        }
    save_file(
        {name: tensor.clone().contiguous() for name, tensor in reference.items()},
        root / "reference.safetensors",
    )
    return root


REMOTE = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import PIL.Image
    import torch
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForMaskedImageModeling,
        pipeline,
    )

    root = Path(sys.argv[1])
    classifier_dir, mim_dir = str(root / "classifier"), str(root / "mim")
    ref = load_file(root / "reference.safetensors")
    image = PIL.Image.open(root / "image.png")
    report = {}
    try:
        import vitrail  # noqa: F401
        report["vitrail_importable"] = True
    except ImportError:
        report["vitrail_importable"] = False

    def max_diff(a, b):
        return float((a - b).abs().max())

    loaded = {"config": AutoConfig.from_pretrained(classifier_dir, trust_remote_code=True)}
    report["loading"] = {}
    for name, auto, folder in [
        ("classifier", AutoModelForImageClassification, classifier_dir),
        ("backbone", AutoModel, classifier_dir),
        ("mim", AutoModelForMaskedImageModeling, mim_dir),
    ]:
        loaded[name], info = auto.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        report["loading"][name] = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys")}
    loaded["processor"] = AutoImageProcessor.from_pretrained(classifier_dir, trust_remote_code=True)
    report["classes"] = {name: [type(obj).__module__, type(obj).__name__] for name, obj in loaded.items()}
    report["id2label"] = {str(k): v for k, v in loaded["config"].id2label.items()}

    with torch.no_grad():
        pixel_values = loaded["processor"](image, return_tensors="pt")["pixel_values"]
        logits = loaded["classifier"](ref["inputs"]).logits
        mim = loaded["mim"](ref["inputs"], bool_masked_pos=ref["bool_masked_pos"])
        report["pixel_values_diff"] = max_diff(pixel_values, ref["image_pixel_values"])
        report["logits_equal"] = torch.equal(logits, ref["logits"])
        report["logits_diff"] = max_diff(logits, ref["logits"])
        pooled = loaded["backbone"](ref["inputs"]).pooler_output
        report["pooler_diff"] = max_diff(pooled, ref["pooler_output"])
        report["reconstruction_diff"] = max_diff(mim.reconstruction, ref["reconstruction"])
        report["mim_loss_diff"] = abs(mim.loss.item() - ref["mim_loss"].item())

    classify = pipeline("image-classification", model=classifier_dir, trust_remote_code=True)
    report["classification"] = classify(image, top_k=None)
    report["classification_model"] = type(classify.model).__module__
    extract = pipeline("image-feature-extraction", model=classifier_dir, trust_remote_code=True)
    features = torch.tensor(extract(image))
    report["features_shape"] = list(features.shape)
    report["features_diff"] = max_diff(features, ref["image_hidden_state"])
    pooled = torch.tensor(extract(image, pool=True))
    report["pooled_features_diff"] = max_diff(pooled, ref["image_pooler_output"])
    report["extraction_model"] = [type(extract.model).__module__, type(extract.model).__name__]

    # One pickle policy in the Hub-carried code too.
    try:
        AutoModelForImageClassification.from_pretrained(str(root / "pickled"), trust_remote_code=True)
        report["pickle_error"] = None
    except OSError as error:
        report["pickle_error"] = str(error)
    opted_in = AutoModelForImageClassification.from_pretrained(
        str(root / "pickled"), trust_remote_code=True, allow_pickle=True
    )
    with torch.no_grad():
        report["pickle_opt_in_logits_diff"] = max_diff(opted_in(ref["inputs"]).logits, ref["logits"])

    # Saving from the Hub-carried code: the MIM folder was loaded without its processor, so its module cache holds
    # only the model's two files; the saved folder must name no third one. Saving a processor there completes it.
    resaved = root / "resaved"
    loaded["mim"].save_pretrained(resaved)
    report["resaved_alone"] = {
        "auto_map": json.loads((resaved / "config.json").read_text())["auto_map"],
        "code": sorted(p.name for p in resaved.glob("*.py")),
    }
    loaded["processor"].save_pretrained(resaved)
    loaded["mim"].save_pretrained(resaved)
    report["resaved_with_processor"] = {
        "auto_map": json.loads((resaved / "config.json").read_text())["auto_map"],
        "code": sorted(p.name for p in resaved.glob("*.py")),
    }

    # The Hub-carried class cannot convert a foreign checkpoint (that code lives in the package): it says so.
    try:
        type(loaded["classifier"]).from_pretrained(str(root / "hf_vit"))
        report["foreign_error"] = None
    except ImportError as error:
        report["foreign_error"] = str(error)

    report["vitrail_modules"] = sorted(
        name for name, module in sys.modules.items() if module is not None and name.split(".")[0] == "vitrail"
    )
    Path(sys.argv[2]).write_text(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def remote(folders) -> dict:
    """Run every Hub-code check in one fresh interpreter that cannot import vitrail; return its report."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(folders / "hf_home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    return run_without_vitrail(REMOTE, folders, root=folders, env=env)


def test_folder_carries_code_and_auto_map(folders):
    """save_pretrained copies the three code files and maps every Auto class a user may reach for."""
    for name, head in (
        ("classifier", "AutoModelForImageClassification"),
        ("mim", "AutoModelForMaskedImageModeling"),
    ):
        folder = folders / name
        for code in CODE_FILES:
            assert (folder / code).is_file(), (name, code)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert auto_map["AutoConfig"] == "configuration_vitrail.VitrailConfig"
        assert auto_map["AutoModel"] == "modeling_vitrail.VitrailModel"
        assert auto_map[head].startswith("modeling_vitrail.Vitrail")
        assert auto_map["AutoImageProcessor"] == "image_processing_vitrail.VitrailImageProcessor"
    processor_config = json.loads((folders / "classifier" / "preprocessor_config.json").read_text())
    assert (
        processor_config["auto_map"]["AutoImageProcessor"] == "image_processing_vitrail.VitrailImageProcessor"
    )


def test_remote_process_cannot_see_vitrail(remote):
    """The checks below ran on the folder's copied code: vitrail itself was never imported."""
    assert remote["vitrail_importable"] is False
    assert remote["vitrail_modules"] == []


def test_remote_classes_come_from_the_folder(remote):
    """Config, heads, backbone and processor are the right classes, loaded from `transformers_modules`."""
    expected = {
        "config": "VitrailConfig",
        "classifier": "VitrailForImageClassification",
        "backbone": "VitrailModel",
        "mim": "VitrailForMaskedImageModeling",
        "processor": "VitrailImageProcessor",
    }
    for name, class_name in expected.items():
        module, loaded_name = remote["classes"][name]
        assert loaded_name == class_name, name
        assert module.startswith("transformers_modules."), (name, module)
        assert not module.startswith("vitrail"), (name, module)
    assert remote["id2label"] == {str(k): v for k, v in ID2LABEL.items()}


def test_remote_weights_load_completely(remote):
    """No weight is left at initialisation; AutoModel on a classifier drops only the head."""
    for name in ("classifier", "backbone", "mim"):
        assert remote["loading"][name]["missing_keys"] == [], name
    assert remote["loading"]["classifier"]["unexpected_keys"] == []
    assert remote["loading"]["mim"]["unexpected_keys"] == []
    assert remote["loading"]["backbone"]["unexpected_keys"] == ["classifier.bias", "classifier.weight"]


def test_remote_outputs_match_references(remote):
    """Processor pixels, classifier logits, backbone pooler output and MIM reconstruction all reproduce."""
    assert remote["pixel_values_diff"] <= ATOL
    assert remote["logits_equal"] or remote["logits_diff"] <= ATOL, remote["logits_diff"]
    assert remote["pooler_diff"] <= ATOL
    assert remote["reconstruction_diff"] <= ATOL
    assert remote["mim_loss_diff"] <= ATOL


def test_remote_classification_pipeline(remote, folders):
    """The pipeline names classes from id2label with the model's own probabilities, which sum to 1."""
    results = remote["classification"]
    assert remote["classification_model"].startswith("transformers_modules.")
    assert sorted(r["label"] for r in results) == sorted(ID2LABEL.values())
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-5)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    probabilities = load_file(folders / "reference.safetensors")["image_probabilities"]
    for result in results:
        label_id = next(k for k, v in ID2LABEL.items() if v == result["label"])
        assert result["score"] == pytest.approx(probabilities[label_id].item(), abs=1e-5), result
    assert max(probabilities) - min(probabilities) > 0.05  # the scores above are not all ~1/3 by accident


def test_remote_feature_extraction_pipeline(remote):
    """image-feature-extraction gives every backbone token, (1, 1 + 15 * 15, hidden), or the pooled vector."""
    assert remote["extraction_model"][1] == "VitrailModel"
    assert remote["extraction_model"][0].startswith("transformers_modules.")
    assert remote["features_shape"] == [1, 226, 32]
    assert remote["features_diff"] <= 1e-5
    assert remote["pooled_features_diff"] <= 1e-5


@pytest.fixture
def no_prompt(monkeypatch) -> list:
    """Answer transformers' interactive trust question as a non-interactive session does, and record it."""
    prompts = []

    def refuse(prompt=""):
        prompts.append(prompt)
        raise EOFError

    monkeypatch.setattr(builtins, "input", refuse)
    return prompts


def test_local_pipeline_without_trust_remote_code(folders, no_prompt):
    """With vitrail imported, the registered local classes load the folder: no trust_remote_code needed."""
    classify = pipeline("image-classification", model=str(folders / "classifier"))
    assert type(classify.model).__module__ == "vitrail.modeling_vitrail"
    assert type(classify.image_processor) is VitrailImageProcessor
    results = classify(PIL.Image.open(folders / "image.png"), top_k=None)
    reference = load_file(folders / "reference.safetensors")
    for result in results:
        label_id = next(k for k, v in ID2LABEL.items() if v == result["label"])
        assert result["score"] == pytest.approx(reference["image_probabilities"][label_id].item(), abs=1e-5)

    mim = AutoModelForMaskedImageModeling.from_pretrained(folders / "mim")
    assert type(mim) is VitrailForMaskedImageModeling
    with torch.no_grad():
        out = mim(reference["inputs"], bool_masked_pos=reference["bool_masked_pos"])
    torch.testing.assert_close(out.reconstruction, reference["reconstruction"], atol=ATOL, rtol=0)


def test_local_pipeline_asks_nothing(folders, no_prompt):
    """An installed vitrail should open its own folders without an interactive trust_remote_code prompt."""
    pipeline("image-classification", model=str(folders / "classifier"))
    assert no_prompt == []


def test_remote_class_names_what_converting_a_foreign_checkpoint_needs(remote):
    assert "model_type 'vit'" in remote["foreign_error"] and "pip install vitrail" in remote["foreign_error"]


def test_remote_refuses_pickled_weights_unless_asked(remote):
    assert "only pickled ones (pytorch_model.bin)" in remote["pickle_error"]
    assert "allow_pickle=True" in remote["pickle_error"]
    assert remote["pickle_opt_in_logits_diff"] <= ATOL


def test_remote_save_names_only_code_it_carries(remote):
    """A model saved from Hub-carried code without its processor names no processor code in `auto_map`; once the
    processor is saved into the folder, the model's next save maps it, and every named file is present."""
    for key, processor in (("resaved_alone", False), ("resaved_with_processor", True)):
        auto_map, code = remote[key]["auto_map"], remote[key]["code"]
        assert {f"{ref.split('.')[0]}.py" for ref in auto_map.values()} <= set(code), key
        assert ("AutoImageProcessor" in auto_map) is processor, key
    assert remote["resaved_alone"]["code"] == ["configuration_vitrail.py", "modeling_vitrail.py"]


# ---- saving from Hub-carried code: the processor's code file is found where transformers keeps it ----------

RESAVE = textwrap.dedent(
    """
    import json
    import logging
    import sys
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root, report_path = Path(sys.argv[1]), sys.argv[2]
    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger().addHandler(Keep(logging.WARNING))

    def saved(folder):
        return {
            "auto_map": json.loads((folder / "config.json").read_text())["auto_map"],
            "code": sorted(p.name for p in folder.glob("*.py")),
            "warnings": [w for w in warnings if "image_processing_vitrail.py" in w],
        }

    report = {}
    # The processor loaded with its model: saved in either order, the folder is complete.
    model = AutoModelForImageClassification.from_pretrained(root / "mine", trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(root / "mine", trust_remote_code=True)
    report["code_folders"] = sorted(
        {str(Path(sys.modules[type(obj).__module__].__file__).parent) for obj in (model, processor)}
    )
    for order in ("model_first", "processor_first"):
        warnings.clear()
        objects = (model, processor) if order == "model_first" else (processor, model)
        for obj in objects:
            obj.save_pretrained(root / order)
        report[order] = saved(root / order)
    # Another folder's model, whose processor was never loaded (one of another folder is): no processor code.
    warnings.clear()
    other = AutoModelForImageClassification.from_pretrained(root / "other", trust_remote_code=True)
    other.save_pretrained(root / "other_saved")
    report["never_loaded"] = saved(root / "other_saved")
    Path(report_path).write_text(json.dumps(report))
    """
)


def test_remote_save_finds_the_loaded_processors_code(folders, tmp_path):
    """A model and its processor loaded from a local folder through its own code, then saved to a new folder
    (model first, or processor first): config.json maps AutoImageProcessor, the three code files are there, and
    nothing warns that the processor's code is missing, although transformers keeps each file's code in its own
    content-hashed module folder. A model of another folder whose processor was never loaded still maps none
    and says so."""
    for name in ("mine", "other"):
        shutil.copytree(folders / "classifier", tmp_path / name)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    report = run_without_vitrail(RESAVE, tmp_path, root=tmp_path, env=env)
    for order in ("model_first", "processor_first"):
        saved = report[order]
        assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_vitrail.VitrailImageProcessor", (
            order
        )
        assert saved["code"] == sorted(CODE_FILES), order
        assert saved["warnings"] == [], order
        saved_code = (tmp_path / order / "image_processing_vitrail.py").read_bytes()
        assert saved_code == (folders / "classifier" / "image_processing_vitrail.py").read_bytes(), order
    assert "AutoImageProcessor" not in report["never_loaded"]["auto_map"]
    assert report["never_loaded"]["code"] == ["configuration_vitrail.py", "modeling_vitrail.py"]
    assert len(report["never_loaded"]["warnings"]) == 1
    assert "save the image processor into the same folder" in report["never_loaded"]["warnings"][0]


# ---- transformers older than 5: one sentence, not a missing name ------------------------------------------

OLD_TRANSFORMERS = "4.57.1"
IMPORT_CODE_FILES = textwrap.dedent(
    """
    import importlib.util
    import json
    import sys
    import traceback
    from pathlib import Path

    folder, old_transformers, report_path = sys.argv[1:]
    sys.path.insert(0, old_transformers)
    import transformers

    report = {"transformers": transformers.__version__, "errors": {}}
    for name in ("configuration_vitrail.py", "modeling_vitrail.py", "image_processing_vitrail.py"):
        spec = importlib.util.spec_from_file_location(Path(name).stem, Path(folder) / name)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            report["errors"][name] = None
        except ImportError as error:
            raised_in = Path(traceback.extract_tb(error.__traceback__)[-1].filename).name
            report["errors"][name] = [str(error), raised_in]
    Path(report_path).write_text(json.dumps(report))
    """
)
NEEDS_5 = 'needs transformers >= 5.0, not {version}: run pip install -U "transformers>=5".'


def test_code_files_refuse_transformers_4_in_one_sentence(folders, tmp_path):
    """Each travelling file, imported from a saved folder where transformers reports a 4.x version, raises its own
    ImportError naming the version it needs and the pip command, before any transformers-5-only import fails."""
    fake = tmp_path / "old" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f'__version__ = "{OLD_TRANSFORMERS}"\n')
    report = run_without_vitrail(
        IMPORT_CODE_FILES, folders / "classifier", fake.parent, root=tmp_path, env={}
    )
    assert report["transformers"] == OLD_TRANSFORMERS
    for name in CODE_FILES:
        message, raised_in = report["errors"][name]
        assert message.endswith(NEEDS_5.format(version=OLD_TRANSFORMERS)), (name, message)
        assert raised_in == name


LOAD_WITH_OLD_TRANSFORMERS = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    folder, site, report_path = sys.argv[1:]
    sys.path.insert(0, site)
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    report = {"transformers": transformers.__version__, "file": transformers.__file__, "errors": {}}
    for auto in (AutoConfig, AutoModelForImageClassification, AutoImageProcessor):
        try:
            auto.from_pretrained(folder, trust_remote_code=True)
            report["errors"][auto.__name__] = None
        except Exception as error:
            report["errors"][auto.__name__] = [type(error).__name__, str(error)]
    Path(report_path).write_text(json.dumps(report))
    """
)


@pytest.mark.slow
def test_transformers_4_57_loading_a_folder_gets_the_sentence(folders, tmp_path):
    """Slow (reason: pip downloads transformers 4.57 with the huggingface_hub and tokenizers it accepts, ~15 s
    and ~20 MB): in a process that finds them first on its path and cannot import vitrail, AutoConfig, the model
    and the image processor each fail with the one-sentence ImportError, not with a missing transformers name."""
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(site),
            "transformers==4.57.*",
            "huggingface_hub>=0.34,<1.0",
            "tokenizers>=0.22,<=0.23.0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"pip could not install transformers 4.57: {install.stderr.strip().splitlines()[-1:]}")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TRANSFORMERS_VERBOSITY": "error"}
    report = run_without_vitrail(
        LOAD_WITH_OLD_TRANSFORMERS, folders / "classifier", site, root=tmp_path, env=env
    )
    assert report["transformers"].startswith("4.57.") and report["file"].startswith(str(site))
    for auto, (kind, message) in report["errors"].items():
        assert kind == "ImportError", (auto, kind, message)
        assert message.endswith(NEEDS_5.format(version=report["transformers"])), (auto, message)
