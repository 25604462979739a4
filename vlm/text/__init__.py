"""Text side of vlm: the tokenizer, the chat template and (later) the Llama backbone."""

from vlm.text.chat import IGNORE_INDEX, ChatTemplate, count_images
from vlm.text.tokenizer import SPECIAL_TOKENS, Tokenizer

# Llama backbone exports (LlamaConfig, the model) are added here by the engineer who owns llama.py.
__all__ = ["IGNORE_INDEX", "SPECIAL_TOKENS", "ChatTemplate", "Tokenizer", "count_images"]
