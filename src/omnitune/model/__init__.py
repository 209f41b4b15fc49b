"""Model loading, the tiny test model, and adapters."""
