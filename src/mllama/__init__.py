"""mllama: Meta's Llama 3.2-Vision models in plain PyTorch."""
from .config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from .modeling.cache import MllamaCache
from .modeling.mllama import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
from .modeling.text import MllamaTextModel
from .modeling.vision import MllamaVisionModel
from .processing.feature import BatchFeature

__version__ = "0.1.0"

__all__ = [
    "MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig", "MllamaCache", "MllamaForCausalLM",
    "MllamaForConditionalGeneration", "MllamaModel", "MllamaTextModel", "MllamaVisionModel", "BatchFeature",
]
