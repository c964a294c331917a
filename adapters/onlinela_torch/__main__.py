"""``python -m onlinela_torch``: the ``onlinela`` command."""

from .cli import main

raise SystemExit(main())
