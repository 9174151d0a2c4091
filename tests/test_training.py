"""Training: short real runs of scripts/train.py and scripts/pretrain_mim.py, not the full job."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from vitrail.data import digits_dataset, split_dataset
from vitrail.training import (
    DataArguments,
    ModelArguments,
    VitrailTrainer,
    build_model,
    load_splits,
    parameter_groups,
    parse_args,
    prepare_splits,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "image_size=8,patch_size=2,encoder_stride=2,num_channels=1,hidden_size=32,num_hidden_layers=2,"
    "num_attention_heads=4,intermediate_size=64,pooling=mean,use_cls_token=false,layer_norm_eps=1e-6"
)
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--logging_steps", "5"]
OUTPUTS = {
    "model.safetensors", "config.json", "preprocessor_config.json", "configuration_vitrail.py",
    "modeling_vitrail.py", "image_processing_vitrail.py", "all_results.json", "README.md",
    "training_curves.png", "confusion_matrix.png",
}  # fmt: skip


def run_train(tmp_path: Path, *extra: str, name: str = "run") -> tuple[dict, Path]:
    out = tmp_path / name
    args = ["--output_dir", str(out), "--config_overrides", TINY, *QUIET, *extra]
    metrics = train(*parse_args(args))
    return metrics, out


def test_split_is_stratified_and_disjoint():
    splits = split_dataset(digits_dataset(), "label", test_size=0.2, validation_size=0.1, seed=0)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes["test"] == 360 and sum(sizes.values()) == 1797
    for split in splits.values():
        counts = np.bincount(split["label"], minlength=10) / len(split)
        assert np.all(np.abs(counts - 0.1) < 0.03)  # every class near 10% in every split
    again = split_dataset(digits_dataset(), "label", test_size=0.2, validation_size=0.1, seed=0)
    assert again["test"]["label"] == splits["test"]["label"]


def test_one_process_training_learns(tmp_path):
    # A run long enough to be decisive, not a coin toss: 800 steps (20 epochs of batch 32) with warm-up and cosine
    # decay reach 0.906-0.956 test accuracy over seeds 0-4, 7 and 42, both on AVX-512/AMX and with
    # ATEN_CPU_CAPABILITY=avx2 (12 epochs of batch 64 gave 0.51-0.74). Chance is 0.1; the bound sits far below.
    metrics, out = run_train(
        tmp_path, "--num_train_epochs", "20", "--learning_rate", "3e-3", "--per_device_train_batch_size", "32",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--eval_strategy", "epoch", "--save_strategy", "no",
    )  # fmt: skip
    assert metrics["test_accuracy"] > 0.75
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    results = json.loads((out / "all_results.json").read_text())
    assert (
        results["test_accuracy"] == pytest.approx(metrics["test_accuracy"]) and results["train_runtime"] > 0
    )
    card = (out / "README.md").read_text()
    assert "model-index" in card and f"{metrics['test_accuracy']:.4f}"[:4] in card
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    # scripts/evaluate_checkpoint.py scores the saved folder on the same test split and gets the same accuracy.
    from vitrail.evaluate_checkpoint import EvaluateArguments, evaluate_checkpoint

    scored = evaluate_checkpoint(
        EvaluateArguments(model=str(out), output_dir=str(tmp_path / "eval")), DataArguments()
    )
    assert scored["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_weight_decay_and_layer_decay_groups():
    model, _ = build_model(ModelArguments(config_overrides=TINY.replace("use_cls_token=false", "use_cls_token=true")
                                          .replace("pooling=mean", "pooling=cls")), [str(i) for i in range(3)])  # fmt: skip
    groups = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    for name in ("vitrail.embeddings.position_embeddings", "vitrail.embeddings.cls_token",
                 "vitrail.encoder.layers.0.norm1.weight", "vitrail.encoder.layers.1.mlp.fc1.bias"):  # fmt: skip
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["vitrail.encoder.layers.0.mlp.fc1.weight"]["weight_decay"] == 0.05
    assert by_name["classifier.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["vitrail.encoder.layers.1.attention.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["vitrail.encoder.layers.0.attention.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.25)
    assert by_name["vitrail.embeddings.patch_embeddings.projection.weight"]["lr"] == pytest.approx(
        1e-3 * 0.125
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_resume_continues_from_the_saved_step(tmp_path, monkeypatch):
    common = ["--per_device_train_batch_size", "128", "--save_strategy", "steps", "--save_steps", "4",
              "--max_train_samples", "512"]  # fmt: skip
    run_train(tmp_path, *common, "--max_steps", "4", name="resume")
    out = tmp_path / "resume"
    assert (out / "checkpoint-4").is_dir()
    steps = []
    real_step = VitrailTrainer.training_step
    monkeypatch.setattr(
        VitrailTrainer,
        "training_step",
        lambda self, *args: steps.append(self.state.global_step) or real_step(self, *args),
    )
    # Same output_dir, longer budget (another schedule, so resumed explicitly): runs steps 5..8 only.
    metrics, _ = run_train(tmp_path, *common, "--max_steps", "8", "--resume_from_checkpoint",
                           str(out / "checkpoint-4"), name="resume")  # fmt: skip
    assert steps == [4, 5, 6, 7]  # the global step before each: nothing re-run before step 4
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # The loss is logged at each checkpoint (4, 8) and every 5 steps; the first log came from checkpoint-4.
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [4, 5, 8]
    # ... and an explicit --resume_from_checkpoint works too.
    metrics, _ = run_train(tmp_path, *common, "--max_steps", "8", "--resume_from_checkpoint",
                           str(out / "checkpoint-4"), name="explicit")  # fmt: skip
    assert metrics["train_runtime"] >= 0


def make_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class=6) -> Path:
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = np.full((12, 10, 3), 60 * index, dtype=np.uint8) + rng.integers(
                0, 40, (12, 10, 3), dtype=np.uint8
            )
            PIL.Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def test_image_folder_trains(tmp_path):
    folder = make_image_folder(tmp_path / "pets")
    overrides = TINY.replace("num_channels=1", "num_channels=3")
    metrics, out = run_train(
        tmp_path, "--train_dir", str(folder), "--config_overrides", overrides, "--num_train_epochs", "2",
        "--save_strategy", "no", "--test_size", "0.34", "--validation_size", "0.17",
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["cat", "dog", "owl"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_samples_per_second"] > 0


def test_bad_data_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        run_train(tmp_path, "--train_dir", str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_train(tmp_path, "--train_dir", str(tmp_path / "missing"))
    corrupt = make_image_folder(tmp_path / "corrupt")
    (corrupt / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    # Split fractions that 15 good images allow: the bad file is named by the header check, which runs after the
    # listing is split (the split needs no pixels).
    with pytest.raises(ValueError, match=r"Cannot read image .*broken\.png"):
        run_train(tmp_path, "--train_dir", str(corrupt), "--test_size", "0.34", "--validation_size", "0.17")
    loose = make_image_folder(tmp_path / "loose")
    PIL.Image.new("RGB", (4, 4)).save(loose / "stray.png")
    with pytest.raises(ValueError, match="directly inside"):
        run_train(tmp_path, "--train_dir", str(loose))
    with pytest.raises(ValueError, match="no label column 'digit'"):
        run_train(tmp_path, "--label_column_name", "digit")


def test_bad_config_override_is_named(tmp_path):
    with pytest.raises(ValueError, match="name=value with a VitrailConfig field"):
        build_model(ModelArguments(config_overrides="hidden_sise=3"), ["a", "b"])


def test_changed_labels_reinit_head_and_image_size_resamples(tmp_path):
    _, source = run_train(tmp_path, "--max_steps", "2", "--save_strategy", "no", name="source")
    model, processor = build_model(
        ModelArguments(model_name_or_path=str(source), image_size=12), ["yes", "no"]
    )
    assert model.config.num_labels == 2 and model.classifier.out_features == 2
    assert model.vitrail.embeddings.position_embeddings.shape == (1, 36, 32)  # 6x6 grid, no class token
    assert processor.size == {"height": 12, "width": 12}
    assert model(torch.randn(1, 1, 12, 12)).logits.shape == (1, 2)


def test_mim_pretraining_then_fine_tuning(tmp_path):
    from vitrail.pretraining import MaskingCollator, PretrainArguments, pretrain

    collator = MaskingCollator((4, 4), mask_ratio=0.5, block=2)
    masks = collator([{"pixel_values": torch.zeros(1, 8, 8)}] * 3)["bool_masked_pos"]
    assert masks.shape == (3, 16) and (masks.sum(1) == 8).all()

    from transformers import TrainingArguments

    overrides = TINY.replace(",pooling=mean,use_cls_token=false", "")
    args = TrainingArguments(output_dir=str(tmp_path / "mim"), num_train_epochs=6, learning_rate=3e-3,
                             per_device_train_batch_size=128, report_to=[], use_cpu=True, logging_steps=3,
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    metrics = pretrain(
        PretrainArguments(config_overrides=overrides), DataArguments(max_train_samples=768), args
    )
    state = json.loads((tmp_path / "mim" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) >= 4 and losses[-1] < 0.8 * losses[0]  # the masked loss falls
    assert metrics["eval_loss"] > 0
    fine, out = run_train(tmp_path, "--model_name_or_path", str(tmp_path / "mim"), "--config_overrides", "",
                          "--num_train_epochs", "2", "--save_strategy", "no", name="ft")  # fmt: skip
    assert 0.0 <= fine["test_accuracy"] <= 1.0
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 10


def test_batch_augment_is_exact_where_it_should_be():
    from vitrail.data import AugmentationConfig, BatchAugment

    images = torch.randn(4, 3, 10, 6)
    # No augmentation asked: the identity.
    torch.testing.assert_close(BatchAugment(AugmentationConfig())(images), images, atol=1e-5, rtol=0)
    flipped = BatchAugment(AugmentationConfig(hflip=1.0))(images)
    torch.testing.assert_close(flipped, images.flip(-1))
    # A shift pulls in pixels from outside the image; they take the fill value (normalised black), not zero.
    ones = torch.ones(64, 1, 8, 8)
    shifted = BatchAugment(AugmentationConfig(translate=0.4), fill=-1.0)(ones)
    assert shifted.min() == pytest.approx(-1.0) and shifted.max() == pytest.approx(1.0)
    per_sample = shifted.flatten(1).mean(1)
    assert per_sample.unique().numel() > 32  # every sample gets its own shift
    # The fill follows the processor's channel count and statistics (4-band models too).
    from vitrail import VitrailImageProcessor
    from vitrail.data import black_level

    four = BatchAugment(
        AugmentationConfig(translate=0.4), fill=black_level(VitrailImageProcessor(num_channels=4))
    )
    assert four(torch.ones(64, 4, 8, 8)).min() == pytest.approx(-1.0)
    crops = BatchAugment(AugmentationConfig(crop_scale=0.3))(images)
    assert crops.shape == images.shape and not torch.allclose(crops, images)


def test_batch_augment_runs_on_the_batch_device():
    """The Trainer's data loader puts batches on the training device (a GPU) before the augmentation sees them:
    its grid and fill must follow. The meta device stands in for a GPU here (tests/test_cuda.py runs a GPU)."""
    from vitrail.data import AugmentationConfig, BatchAugment

    everything = AugmentationConfig(crop_scale=0.5, hflip=0.5, rotation=10, translate=0.1, scale=0.1)
    out = BatchAugment(everything, fill=torch.tensor([-1.0, 0.0, 1.0]))(
        torch.zeros(4, 3, 8, 8, device="meta")
    )
    assert out.device.type == "meta" and out.shape == (4, 3, 8, 8)


def test_cached_and_on_the_fly_splits_give_the_same_batches():
    """transformers' `default_data_collator` batches both forms of a prepared split alike (a tensor cache, and a
    `datasets` split processed on the fly): the same pixels, and int64 class ids as labels."""
    from transformers import default_data_collator

    _, processor = build_model(ModelArguments(config_overrides=TINY), [str(i) for i in range(10)])
    batches = {}
    for cache in (True, False):
        data_args = DataArguments(cache_pixels=cache, max_train_samples=16)
        splits = load_splits(data_args).splits
        prepare_splits(splits, processor, data_args)
        prepared = splits["train"]
        batches[type(prepared).__name__] = default_data_collator([prepared[i] for i in range(16)])
    assert batches.keys() == {"ProcessedSplit", "Dataset"}
    cached, on_the_fly = batches.values()
    assert cached.keys() == on_the_fly.keys() == {"pixel_values", "labels"}
    assert cached["pixel_values"].shape == (16, 1, 8, 8) and cached["pixel_values"].dtype == torch.float32
    assert cached["labels"].dtype == torch.int64
    for key in ("pixel_values", "labels"):
        torch.testing.assert_close(cached[key], on_the_fly[key], rtol=0, atol=0)  # dtypes included


def test_evaluation_batches_are_not_augmented(tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from vitrail.data import AugmentationConfig, BatchAugment
    from vitrail.training import ProcessedSplit, VitrailTrainer

    model, _ = build_model(ModelArguments(config_overrides=TINY), [str(i) for i in range(10)])
    pixels, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=8
    )
    trainer = VitrailTrainer(
        model=model.eval(),
        args=args,
        data_collator=default_data_collator,
        augment=BatchAugment(AugmentationConfig(rotation=30, translate=0.3, hflip=0.5)),
    )
    predicted = trainer.predict(ProcessedSplit(pixels, labels)).predictions
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(predicted), model(pixels).logits)


@pytest.mark.parametrize(
    "flags",
    [
        ["--bf16", "true"],
        ["--rand_augment", "true", "--crop_scale", "0.5", "--hflip", "0.5"],
        ["--mixup_alpha", "0.8", "--cutmix_alpha", "1.0", "--layer_decay", "0.75"],
    ],
    ids=["bf16-autocast", "randaugment-crop-flip", "mixup-cutmix-layer-decay"],
)
def test_optional_training_paths_run(tmp_path, flags):
    """Each optional path trains a few steps and ends with finite losses and a full output folder."""
    metrics, out = run_train(
        tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "32", "--save_strategy", "no",
        "--max_train_samples", "96", "--max_eval_samples", "64", *flags,
    )  # fmt: skip
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["test_loss"])
    assert OUTPUTS <= {p.name for p in out.iterdir()}


def test_fine_tune_from_a_transformers_vit_checkpoint(tmp_path):
    """`--model_name_or_path` may name a transformers ViT folder: it is converted on load, gets a new 10-class
    head, trains, and the result is a vitrail checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification

    source = tmp_path / "hf-vit"
    vit_config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(vit_config).save_pretrained(source)
    metrics, out = run_train(
        tmp_path, "--model_name_or_path", str(source), "--max_steps", "3", "--save_strategy", "no",
        "--config_overrides", "",
    )  # fmt: skip
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "vitrail" and len(saved["id2label"]) == 10
    assert saved["position_interpolation"] == "bicubic"  # transformers' ViT convention, carried over
