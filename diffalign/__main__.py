"""``python -m diffalign`` is the ``diffalign`` command."""

import sys

from diffalign.cli import main

sys.exit(main())
