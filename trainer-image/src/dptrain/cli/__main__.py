"""`python -m dptrain.cli` (how a distributed run starts its workers)."""

import sys

from dptrain.cli import main

sys.exit(main())
