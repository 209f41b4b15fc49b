"""`python -m omnitune`: the same CLI as the `omnitune` command."""

from omnitune.cli import app

app()
