"""The evaluation stage: base vs tuned scoring and its report."""
