"""``python -m normprobe`` runs the command-line interface."""

from normprobe.cli import main

raise SystemExit(main())
