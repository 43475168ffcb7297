"""The fine-tuning DAG and the ways to run it: compiled for a cluster, or locally through kfp.local."""
