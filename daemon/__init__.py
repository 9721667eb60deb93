"""ldx-hotfolder: a watched-folder daemon that converts scans with the LDX hub RenderOCR API."""

__version__ = "0.1.0"
