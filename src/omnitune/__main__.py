"""`python -m omnitune` (what torchrun / accelerate launch start on every GPU)."""

from omnitune.cli import app

app()
