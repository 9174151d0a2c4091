"""vitrail: the Vision Transformer as a first-class citizen of the Hugging Face ecosystem.

Importing vitrail registers its config, models and image processor with transformers' Auto classes, and gives the
model classes the package's `from_pretrained` (`vitrail.loading`: conversion of other implementations' checkpoints,
new image sizes and label sets). Imports run one way: the three files that travel with a checkpoint
(`configuration_vitrail`, `modeling_vitrail`, `image_processing_vitrail`) import nothing else of vitrail.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.utils import is_torchvision_available

from .configuration_vitrail import VARIANTS, VitrailConfig
from .image_processing_vitrail import VitrailImageProcessor
from .loading import load_pretrained
from .modeling_vitrail import (
    VitrailBackbone,
    VitrailForImageClassification,
    VitrailForMaskedImageModeling,
    VitrailModel,
    VitrailPreTrainedModel,
)

__version__ = "0.1.0"

VitrailPreTrainedModel.pretrained_loader = load_pretrained

AutoConfig.register(VitrailConfig.model_type, VitrailConfig, exist_ok=True)
AutoModel.register(VitrailConfig, VitrailModel, exist_ok=True)
AutoBackbone.register(VitrailConfig, VitrailBackbone, exist_ok=True)
AutoModelForImageClassification.register(VitrailConfig, VitrailForImageClassification, exist_ok=True)
AutoModelForMaskedImageModeling.register(VitrailConfig, VitrailForMaskedImageModeling, exist_ok=True)
AutoImageProcessor.register(
    VitrailConfig, image_processor_classes={"pil": VitrailImageProcessor}, exist_ok=True
)
# vitrail has no video processor. Saying so stops pipelines from guessing a remote "VitrailVideoProcessor" from the
# image processor's auto_map and asking on stdin whether to run it. (Video processors exist only with torchvision.)
if is_torchvision_available():
    from transformers import AutoVideoProcessor

    AutoVideoProcessor.register(VitrailConfig, video_processor_classes={}, exist_ok=True)

__all__ = [
    "VARIANTS",
    "VitrailBackbone",
    "VitrailConfig",
    "VitrailForImageClassification",
    "VitrailForMaskedImageModeling",
    "VitrailImageProcessor",
    "VitrailModel",
    "VitrailPreTrainedModel",
]
