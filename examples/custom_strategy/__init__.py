"""A user-written strategy, loaded by name from the config (see README.md in this folder)."""
