"""``python -m amqp_batch``: the same as the ``amqp-batch`` command."""

import sys

from ._cli import main

sys.exit(main())
