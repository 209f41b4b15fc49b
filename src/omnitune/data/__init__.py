"""Omni data: conversations -> decoded media -> processor inputs + labels -> cache -> batches."""
