"""kftune: fine-tune causal LMs with full, LoRA or QLoRA training and run the lifecycle on Kubeflow."""

__version__ = "0.1.0"
