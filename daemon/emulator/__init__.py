"""LDX hub emulator: a local stand-in for the RenderOCR API, part of the product."""
