"""`python -m asyncckpt`: the `asyncckpt` command."""

import sys

from ._cli import main

sys.exit(main())
