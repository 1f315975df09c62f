"""gcnee: LLM click-through-rate recommenders with GCN-retrieved prompts and multi-head early exit."""

__version__ = "0.1.0"
