"""orchestrator: study files -> Ray Tune sweep of Ray Train DDP trials -> MLflow + Parquet records."""
