"""``python -m keel.cli`` runs the ``keel`` command."""

from keel.cli.main import main

main()
