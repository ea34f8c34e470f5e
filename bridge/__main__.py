"""`python -m bridge` does what the `esim-bridge` console script does."""

from bridge.cli import main

raise SystemExit(main())
