"""vlm: vision-language models on one Llama backbone, with early or deep fusion."""

__version__ = "0.1.0"
