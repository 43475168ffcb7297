"""The training stage: config, training, launch, memory pre-flight, checkpoints."""
