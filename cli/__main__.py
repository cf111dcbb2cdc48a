"""``python -m gpuconn.cli``: the same as the ``gpuconn`` command."""

from .app import main

main()
