"""Code that runs inside one trial: backbones, model building, metrics and the Tune trainable.

Importing this package does not import TensorFlow; ``trainables.model`` and ``trainables.trial`` do.
"""

from data.balancing import BALANCING_METHODS
from trainables.backbones import BACKBONES, BackboneSpec, get_backbone
from trainables.metrics import OBJECTIVES, ClassificationMetrics, evaluate_scores

__all__ = ["BACKBONES", "BALANCING_METHODS", "OBJECTIVES", "BackboneSpec", "ClassificationMetrics", "evaluate_scores",
           "get_backbone"]
