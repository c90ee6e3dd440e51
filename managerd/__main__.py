"""``python -m managerd`` is the ``managerd`` command."""

from managerd.cli import main

main()
