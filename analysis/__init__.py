"""analysis: figures and reports regenerated from a study's Parquet records."""
