"""Models: loading, the template fingerprint, inference and adapter merging."""
