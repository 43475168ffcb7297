"""The registry stage: MLflow, the promotion gate, registration and the model card."""
