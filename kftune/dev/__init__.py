"""Local development: the S3 + MLflow stack, the tiny model and the sample data."""
