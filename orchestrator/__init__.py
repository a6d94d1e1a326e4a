"""orchestrator: study files -> Ray Tune sweep of Ray Train DDP trials -> MLflow + Parquet records."""
from pathlib import Path

# The packaged studies (`studyctl launch quickstart`): here, not in study_file.py, so that the CLI's help
# can list them without importing the schema (pydantic, and torch through the core's configs).
PACKAGED_STUDIES = Path(__file__).parent / "studies"


def packaged_study_names() -> list[str]:
    return sorted(f.stem for f in PACKAGED_STUDIES.glob("*.yaml"))
