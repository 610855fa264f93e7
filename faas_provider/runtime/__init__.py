"""The watchdog-compatible runtime that serves one function replica (fprocess or handler.py)."""
