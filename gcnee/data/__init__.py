"""Raw-data readers, CTR samples, the data stage and the embedded default data set."""
