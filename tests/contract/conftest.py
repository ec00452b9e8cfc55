import sys
from pathlib import Path

# consumers.py (stdlib-only driver of the real LMCache / vLLM parsers) lives in tests/consumers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "consumers"))
