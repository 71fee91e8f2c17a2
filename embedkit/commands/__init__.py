"""CLI command modules, one per stage."""
