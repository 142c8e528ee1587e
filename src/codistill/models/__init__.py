"""Model registry. Families are imported explicitly here, one file each."""

from . import cifar_resnet, gpt, small, torchvision_models, transformer  # noqa: F401
from .registry import KINDS, MODELS, build_model, check_model_kind, check_model_options, register_model

__all__ = ["KINDS", "MODELS", "build_model", "check_model_kind", "check_model_options", "register_model"]
