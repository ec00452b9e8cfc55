# Make `import scenario` / `import podrunner` work for the tests in this directory under any
# pytest import mode (test code living next to this file).
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
