"""The CTR language model: backbone loading (``backbone``), prompt building (``prompts``)."""
