"""The small core every stage uses: user-facing errors, atomic output folders, S3 storage."""
