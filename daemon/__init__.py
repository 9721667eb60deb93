"""ldx-hotfolder: a watched-folder daemon that converts scans with the LDX hub RenderOCR API."""

import sys

__version__ = "0.2.0"

# httpx imports its command-line client (click, rich, pygments) whenever they are
# installed, as they are here; no process of this program runs it, and in the transfer
# process it would be a fifth of the memory. A None entry makes that import fail, which
# httpx handles by leaving its ``main`` a stub (httpx/__init__.py).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
