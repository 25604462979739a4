"""vlm: vision-language models on one Llama backbone, with early (LLaVA) or deep (Flamingo) fusion.

The top-level names are imported lazily so that `import vlm` stays cheap (timm and open_clip
take seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "VLMConfig": "vlm.model",
    "VisionLanguageModel": "vlm.model",
    "build_model": "vlm.model",
    "load_model": "vlm.export",
    "save_model": "vlm.export",
    "set_trainable": "vlm.stages",
    "Llama": "vlm.text.llama",
    "LlamaConfig": "vlm.text.llama",
    "load_llama": "vlm.checkpoints",
    "save_llama_hf": "vlm.checkpoints",
    "Tokenizer": "vlm.text.tokenizer",
    "ChatTemplate": "vlm.text.chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")
