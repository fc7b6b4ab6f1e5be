"""A migrated Prefect database to start each test's own ``PREFECT_HOME`` from.

In a fresh ``PREFECT_HOME`` a command's temporary Prefect server first runs every database
migration, a cost most of a short CLI test's run time. A copy of a database migrated once per
session starts the server as a user's second command does: same server, same checks, no
migrations.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


@functools.cache
def _migrated_database() -> Path:
    home = Path(tempfile.mkdtemp(prefix="prefect-template-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env, check=True,
                   capture_output=True, timeout=300)
    return home / "prefect.db"


def prefect_home(path: Path) -> Path:
    """``path`` as a ``PREFECT_HOME`` whose database is already migrated (kept if it has one)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "prefect.db").exists():
        shutil.copyfile(_migrated_database(), path / "prefect.db")
    return path
