"""Pure helpers shared by tests (no services, no I/O)."""
