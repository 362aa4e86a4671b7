"""``python -m hf_lwf``: the ``hf-lwf`` command line."""

import sys

from .app.cli import main


sys.exit(main())
