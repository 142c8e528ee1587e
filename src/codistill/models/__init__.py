"""Model registry. Families are imported explicitly here, one file each."""

from . import cifar_resnet, gpt, small, torchvision_models, transformer  # noqa: F401
from .registry import MODELS, build_model, check_model_options, register_model

__all__ = ["MODELS", "build_model", "check_model_options", "register_model"]
