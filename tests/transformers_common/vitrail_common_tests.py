"""transformers' ModelTesterMixin over vitrail's three classes: a ViT-style tester written for vitrail. Run through
`tests/transformers_common/run.py` (`make test-transformers`), which puts it beside transformers' own tests."""

import os
import tempfile
import unittest

import torch
from safetensors.torch import save_file
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch

from vitrail import VitrailConfig, VitrailForImageClassification, VitrailForMaskedImageModeling, VitrailModel

from .test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

# What an in-tree model lists in transformers' static name tables (the common tests read them to pick labels and to
# skip training tests for bare backbones).
modeling_auto.MODEL_MAPPING_NAMES["vitrail"] = "VitrailModel"
modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES["vitrail"] = "VitrailForImageClassification"
modeling_auto.MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES["vitrail"] = "VitrailForMaskedImageModeling"


class VitrailModelTester:
    def __init__(
        self,
        parent,
        batch_size=13,
        image_size=30,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
    ):
        self.parent = parent
        self.batch_size, self.image_size, self.patch_size = batch_size, image_size, patch_size
        self.num_channels, self.hidden_size = num_channels, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.num_labels = intermediate_size, num_labels
        self.is_training = True
        self.num_patches = (image_size // patch_size) ** 2
        self.seq_length = self.num_patches + 1  # patches + class token
        self.mask_length = self.num_patches  # bool_masked_pos covers the patches only
        self.num_masks = int(0.5 * self.num_patches)

    def get_config(self):
        return VitrailConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            encoder_stride=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


@require_torch
class VitrailModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VitrailModel, VitrailForImageClassification, VitrailForMaskedImageModeling)
    test_resize_embeddings = False
    has_attentions = True

    def setUp(self):
        self.model_tester = VitrailModelTester(self)

    def test_model_get_set_embeddings(self):
        """Vision models have a patch embedding, not an nn.Embedding (transformers' ViT test says the same)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, torch.nn.Linear))

    def test_can_load_ignoring_mismatched_shapes(self):
        """Replaces transformers' version, which expects `from_pretrained(num_labels=42)` to raise unless
        `ignore_mismatched_sizes=True`. vitrail re-initialises only the classification head for a new label set
        and warns (README, "Converting checkpoints"); with `ignore_mismatched_sizes=True` the result is the same."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = VitrailForImageClassification(config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            for extra in ({}, {"ignore_mismatched_sizes": True}):
                with self.assertLogs("vitrail.modeling_vitrail", level="WARNING") as logs:
                    loaded = VitrailForImageClassification.from_pretrained(folder, num_labels=42, **extra)
                self.assertIn("re-initialised", "\n".join(logs.output))
                self.assertEqual(loaded.classifier.out_features, 42)
                for name, tensor in model.vitrail.state_dict().items():
                    self.assertTrue(torch.equal(tensor, loaded.vitrail.state_dict()[name]), name)

    def test_model_weights_reload_no_missing_tied_weights(self):
        """Replaces transformers' version, which expects a checkpoint whose weights were all replaced by one stray
        tensor to load, every parameter left at its initialisation, with a warning. vitrail refuses it by name
        (README, "Loading"): the stray integer tensor before loading, and with a float one, the missing tensors."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                for stray, refusal in (
                    (torch.tensor([1, 2]), "not floating point"),
                    (torch.ones(2), "lacks"),
                ):
                    save_file(
                        {"tensor": stray},
                        os.path.join(folder, "model.safetensors"),
                        metadata={"format": "pt"},
                    )
                    with self.assertRaises(ValueError) as caught:
                        model_class.from_pretrained(folder)
                    self.assertIn(refusal, str(caught.exception))
                    self.assertIn("tensor", str(caught.exception))
                backbone = "" if model.base_model is model else "vitrail."  # a head absent as a whole is new
                self.assertIn(f"lacks {backbone}embeddings.cls_token", str(caught.exception))
