"""The torch-free runtime's commands run in a fresh interpreter whose path starts with a
``torch`` package that raises ImportError: any import of torch, direct or through another
module, breaks the run. Shared by the export tests of every bundle kind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKER = 'raise ImportError("torch is blocked: the runtime must not import it")\n'


def blocked_env(root: Path) -> dict[str, str]:
    """An environment whose ``import torch`` fails (the blocker written under ``root``)."""
    (root / "torch").mkdir(exist_ok=True)
    (root / "torch" / "__init__.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=str(root))


def runtime(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    """``python -m latentcell.export.runtime ARGS`` in ``env``."""
    return subprocess.run([sys.executable, "-m", "latentcell.export.runtime", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
