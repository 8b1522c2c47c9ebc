"""Head-policy calibration: which KV heads of a pretrained model need all history (``segtrain calibrate``).

DuoAttention's recipe with segtrain's semantics: the model is frozen, one gate per (layer, KV head)
mixes the layer's segment attention under ``all`` with the same attention under a bounded policy
(:mod:`.gated`), and the gates learn to reproduce the full-attention model's final hidden states at
the answers of synthetic retrieval samples under an L1 penalty (:mod:`.learner`). The largest gates
within a budget read ``all``, the rest the bounded policy (the gate file's format and that choice:
:mod:`segtrain.checkpoint.calibration`); :mod:`.job` runs it from a model directory to a calibrated
one, resumably. Names resolve lazily, so ``segtrain calibrate --help`` does not import torch.
"""

from __future__ import annotations

from segtrain.lazy import lazy_getattr

_EXPORTS = {
    "GatedAttention": "gated",
    "HeadGates": "gated",
    "with_policy": "gated",
    "calibrate_dir": "job",
    "GateLearner": "learner",
    "CalibrationError": "options",
    "CalibrationOptions": "options",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
