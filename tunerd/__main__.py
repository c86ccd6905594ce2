"""``python -m tunerd``."""

from tunerd.cli import main

raise SystemExit(main())
