"""``python -m idfusion ...`` (and ``accelerate launch -m idfusion ...``): the ``idfusion`` command."""

import sys

from idfusion.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
