"""gcnee: LLM CTR recommenders with GCN-retrieved prompts and multi-head early exit."""

__version__ = "0.1.0"
