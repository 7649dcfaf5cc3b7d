"""docker/image_requirements.py: what the EMR Serverless image installs (the project's pins but pyspark and Airflow),
and that the jobs it runs need nothing it leaves out."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from infra_support import DOCKER, REPO

sys.path.insert(0, str(DOCKER))
import image_requirements  # a build script beside the Dockerfiles, not a package

WITHOUT = ["pyspark", "apache-airflow*"]


def test_the_image_gets_every_pin_but_spark_and_airflow() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    got = image_requirements.requirements(REPO / "pyproject.toml", WITHOUT)
    assert set(got) == {d for d in deps if not d.startswith(("pyspark", "apache-airflow"))}
    assert all("==" in r for r in got) and any(r.startswith("torch==") for r in got)
    assert not any(r.lower().startswith(("pyspark", "apache-airflow")) for r in got)


def test_a_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"--without pyspak: no dependency of .* matches"):
        image_requirements.requirements(REPO / "pyproject.toml", ["pyspak"])


def test_the_remote_jobs_import_without_what_the_image_leaves_out() -> None:
    """The image's own smoke check, here: remote.py and the jobs it runs on EMR import with pyspark and Airflow
    unimportable (Spark's pyspark is put on the path by spark-submit when the job starts, not at import)."""
    code = ("import sys\nfor m in ('pyspark', 'airflow'): sys.modules[m] = None\n"
            "import pipeline.orchestration.remote, pipeline.data.build_matrix, pipeline.serving.spark_engine, "
            "pipeline.serving.job\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    broken = subprocess.run([sys.executable, "-c", code.replace("pipeline.serving.job\n", "pipeline.orchestration.topology\n")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert broken.returncode != 0 and "ModuleNotFoundError" in broken.stderr  # the check can fail: the DAG side needs Airflow
