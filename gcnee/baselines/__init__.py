"""Traditional CTR baselines of the paper's Table 2 (DeepFM, DIN, GRU4Rec, SIM), trained on all
of the training split in the same harness, samples and AUC code as the LLM stages."""

from gcnee.baselines.data import OOV, PAD, FeatureEncoder
from gcnee.baselines.models import DIN, MODELS, SIM, DeepFM, GRU4Rec, build_model
from gcnee.baselines.module import BaselineModule, fit_baseline, predict_proba

__all__ = ["DIN", "MODELS", "OOV", "PAD", "SIM", "BaselineModule", "DeepFM", "FeatureEncoder",
           "GRU4Rec", "build_model", "fit_baseline", "predict_proba"]
