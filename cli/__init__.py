"""The ``gpuconn`` command-line interface (Typer); one small module per command."""
