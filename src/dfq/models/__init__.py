"""Model zoo: float classifiers by name, with normalization and published weights.

Importing this package registers every model.
"""

from dfq.models import (  # noqa: F401  (registers models)
    efficientnet_lite,
    mobilenetv2,
    resnet_cifar_a,
    resnet_cifar_pcv,
    resnet_imagenet,
    resnet_mlperf,
)
from dfq.models._registry import (
    CIFAR10_CLASSES,
    ModelInfo,
    WeightSource,
    create_model,
    get_model_info,
    list_models,
    load_weights,
    read_state_dict,
    register_model,
)

__all__ = [
    "CIFAR10_CLASSES",
    "ModelInfo",
    "WeightSource",
    "create_model",
    "get_model_info",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]
