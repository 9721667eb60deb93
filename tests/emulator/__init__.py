"""The LDX hub emulator: its logic, its HTTP face and its knobs."""
