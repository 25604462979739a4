"""Text side of vlm: the Llama backbone, the tokenizer and the chat template."""

from vlm.text.chat import IGNORE_INDEX, ChatTemplate, count_images
from vlm.text.llama import Cache, Llama, LlamaConfig
from vlm.text.rope import AnyRopeScaling, DynamicScaling, LinearScaling, RopeScaling, YarnScaling
from vlm.text.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = ["IGNORE_INDEX", "SPECIAL_TOKENS", "AnyRopeScaling", "Cache", "ChatTemplate", "DynamicScaling", "LinearScaling", "Llama",
           "LlamaConfig", "RopeScaling", "Tokenizer", "YarnScaling", "count_images"]
