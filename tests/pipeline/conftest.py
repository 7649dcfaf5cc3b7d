"""Shared helpers of the pipeline tests (infer_support.py) live beside this file, for every subfolder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
