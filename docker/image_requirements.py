"""Print the project's direct dependencies (pyproject's pins) that an image installs, one per line, leaving out
those the image's base provides or that the image does not run.

The EMR Serverless image (docker/spark.Dockerfile) leaves out pyspark, which EMR's runtime provides (its own build
of Spark's JVM side, which a pip pyspark must not shadow), and Airflow, which only schedules:
    python image_requirements.py --without pyspark --without 'apache-airflow*' > runtime.txt
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(pyproject: Path, without: list[str]) -> list[str]:
    """The pinned direct dependencies whose names match none of the `without` patterns (case-insensitive)."""
    deps = {d: _name(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]}
    patterns = [p.lower() for p in without]
    unknown = [p for p in patterns if not fnmatch.filter(deps.values(), p)]
    if unknown:  # a typo would silently install what it meant to leave out
        raise SystemExit(f"--without {', '.join(unknown)}: no dependency of {pyproject} matches")
    return [d for d, name in deps.items() if not any(fnmatch.fnmatch(name, p) for p in patterns)]


def _name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise SystemExit(f"cannot read the package name of {requirement!r}")
    return m[1].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    ap.add_argument("--without", action="append", default=[], metavar="PATTERN", help="a package name or glob to leave out")
    args = ap.parse_args(argv)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(args.pyproject, args.without)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
