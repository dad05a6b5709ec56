"""`python -m lorafit ...` is the `lorafit` command (torchrun launches it this way)."""

import sys

from lorafit.cli import main

sys.exit(main())
