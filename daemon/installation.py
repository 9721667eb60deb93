"""Installation: whether the ``daemon`` package this program runs from is its own.

The unrelated ``python-daemon`` distribution installs a package named ``daemon`` too.
Installed into one environment, the two overwrite each other's files: ours may run with
python-daemon's ``__init__.py``, or none at all. No module here imports a name from the
package's ``__init__``, so the program gets as far as its command line, which then says
what happened (``foreign_package``) instead of failing with an import error.
"""

from __future__ import annotations

import os

import daemon as _package

VERSION: str = getattr(_package, "__version__", "unknown")


def foreign_package() -> str | None:
    """Why the ``daemon`` package is not ldx-hotfolder's own, or None when it is."""
    doc = _package.__doc__ or ""
    if doc.startswith("ldx-hotfolder") and hasattr(_package, "__version__"):
        return None
    where = os.path.dirname(getattr(_package, "__file__", None) or "") or "this environment"
    return (
        f"the Python package 'daemon' in {where} is not ldx-hotfolder's: another "
        "distribution (most likely python-daemon) installed a package of the same name "
        "into the same environment, and the two overwrite each other. Install "
        "ldx-hotfolder into a virtual environment of its own (python3.11 -m venv "
        "/opt/ldx-hotfolder, then /opt/ldx-hotfolder/bin/pip install . in the "
        "ldx-hotfolder folder) or with pipx (pipx install . there); see "
        "docs/troubleshooting.md"
    )
