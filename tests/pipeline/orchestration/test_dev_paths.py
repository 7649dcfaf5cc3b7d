"""The developer tools find the repository's files from wherever the package sits (a moved module once made
`make run` look for configs/ inside the package)."""

from __future__ import annotations

from pathlib import Path

from pipeline.io.registry import git_commit
from pipeline.orchestration.dev import local_airflow, story

ROOT = Path(__file__).resolve().parents[3]


def test_story_and_runner_point_at_the_repository() -> None:
    assert story.REPO == ROOT
    assert (story.REPO / "configs" / "embedded-train.yaml").is_file()  # `make run`'s training config
    assert local_airflow.REPO_DAGS == ROOT / "dags" and (local_airflow.REPO_DAGS / "weekly_train.py").is_file()


def test_git_commit_names_this_checkout() -> None:
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert git_commit().split("+")[0] == (head or "unknown")
