"""``python -m hf_lwf``: the ``hf-lwf`` command line."""

import sys

from .cli import main


sys.exit(main())
