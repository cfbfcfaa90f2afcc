"""``python -m p2p``: the same as the ``p2p`` command."""

from p2p.cli import main

main()
