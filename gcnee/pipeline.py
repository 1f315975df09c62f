"""The pipeline: importing this module registers every stage, in pipeline order.

A new stage is a module with a ``@register(...)`` function, added to ``STAGE_MODULES`` after the
stages it reads from; it imports their modules itself, so that importing it alone registers a
valid order too.
"""

import importlib

STAGE_MODULES = [
    "gcnee.data.stage",  # raw files -> CTR samples
    "gcnee.baselines.stage",  # DeepFM, DIN, GRU4Rec, SIM on all of train (Table 2)
    "gcnee.retrieval.stage",  # LightGCN (or llm/random/none) -> similar users
    "gcnee.llm.stage",  # LoRA-tuned CTR LLM
    "gcnee.exits.stage",  # exit heads + threshold sweep
    "gcnee.report.stage",  # logs/<run>/report.md: every stage, Table 2, ablations (last)
]

for _module in STAGE_MODULES:
    importlib.import_module(_module)
