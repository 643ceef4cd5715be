"""mllama: Meta's Llama 3.2-Vision models in plain PyTorch."""
from .config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from .modeling.cache import MllamaCache
from .modeling.mllama import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
from .modeling.text import MllamaTextModel
from .modeling.vision import MllamaVisionModel
from .generation import TextIteratorStreamer, TextStreamer
from .processing.feature import BatchFeature
from .processing.image import MllamaImageProcessor, MllamaImageProcessorPil
from .processing.processor import AutoProcessor, MllamaProcessor
from .processing.tokenizer import MllamaTokenizer

__version__ = "0.1.0"

__all__ = [
    "MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig", "MllamaCache", "MllamaForCausalLM",
    "MllamaForConditionalGeneration", "MllamaModel", "MllamaTextModel", "MllamaVisionModel", "BatchFeature",
    "MllamaImageProcessor", "MllamaImageProcessorPil", "MllamaProcessor", "AutoProcessor", "MllamaTokenizer",
    "TextIteratorStreamer", "TextStreamer",
]
