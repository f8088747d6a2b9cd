"""dinov2_fast: DINOv2 with fused Triton kernels and the Hugging Face transformers API."""

from .config import Dinov2Config, Dinov2WithRegistersConfig
from .cuda_graph import cuda_graph
from .fused import tune
from .modeling import (
    Dinov2Backbone,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2PreTrainedModel,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
)
from .optimize import optimize, register_attention_implementation
from .outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput

__version__ = "0.1.0"


def __getattr__(name: str):
    # embed needs Pillow and tqdm (the cli extra): imported on first use, so the library
    # core imports without them.
    if name == "embed":
        from .embedding import embed

        return embed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackboneOutput",
    "BaseModelOutputWithPooling",
    "Dinov2Backbone",
    "Dinov2Config",
    "Dinov2ForImageClassification",
    "Dinov2Model",
    "Dinov2PreTrainedModel",
    "Dinov2WithRegistersBackbone",
    "Dinov2WithRegistersConfig",
    "Dinov2WithRegistersForImageClassification",
    "Dinov2WithRegistersModel",
    "ImageClassifierOutput",
    "cuda_graph",
    "embed",
    "optimize",
    "register_attention_implementation",
    "tune",
]
