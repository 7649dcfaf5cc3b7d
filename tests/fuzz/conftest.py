"""The property layer over the input boundaries (dates, ids, URIs, configs, event tables): Hypothesis settings.

Deterministic in CI: the `ci` profile (the default) derandomizes the search, so a run explores the same examples
every time, and keeps no example database (nothing written into the repository). `HYPOTHESIS_PROFILE=explore`
searches at random with more examples, for a local hunt; a failure prints the example to add as @example.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))  # infer_support

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

