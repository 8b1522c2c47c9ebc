"""Head-policy calibration: which KV heads of a pretrained model need all history (``segtrain calibrate``).

DuoAttention's recipe with segtrain's semantics: the model is frozen, one gate per (layer, KV head)
mixes the layer's segment attention under ``all`` with the same attention under a bounded policy
(:mod:`.gated`), and the gates learn to reproduce the full-attention model's final hidden states at
the answers of synthetic retrieval samples under an L1 penalty (:mod:`.learner`). The largest gates
within a budget read ``all``, the rest the bounded policy (:mod:`segtrain.checkpoint.calibration`); :mod:`.job` runs it from
a model directory to a calibrated one, resumably.
"""

from segtrain.calibrate.gated import GatedAttention, HeadGates, with_policy
from segtrain.calibrate.job import CalibrationError, CalibrationOptions, calibrate_dir
from segtrain.calibrate.learner import GateLearner
from segtrain.checkpoint.calibration import CALIBRATION_FILE, calibrated_spec, calibrated_table, read_calibration, select_heads

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationError",
    "CalibrationOptions",
    "GateLearner",
    "GatedAttention",
    "HeadGates",
    "calibrate_dir",
    "calibrated_spec",
    "calibrated_table",
    "read_calibration",
    "select_heads",
    "with_policy",
]
