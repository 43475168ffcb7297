"""The registry stage: MLflow, the promotion gate, registration and the model card.

`load_registered` is the stage's public door (README: `from kftune.registry import load_registered`).
"""

from kftune.registry.tracking import load_registered

__all__ = ["load_registered"]
