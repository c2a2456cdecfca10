"""``python -m morphnet``: the same as the ``morphnet`` command."""

import sys

from morphnet.cli.main import main

sys.exit(main())
