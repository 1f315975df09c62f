"""The pipeline: importing this module registers every stage, in pipeline order."""

from gcnee.data import stage as data_stage  # noqa: F401  data
from gcnee.retrieval import stage as retriever_stage  # noqa: F401
from gcnee.llm import stage as llm_stage  # noqa: F401
from gcnee.exits import stage as exits_stage  # noqa: F401
