"""Similar-user retrieval: LightGCN (the paper's GCN-retriever), the LLM-embedding baseline,
random and none, all behind :class:`gcnee.retrieval.similar.SimilarUsers`."""
