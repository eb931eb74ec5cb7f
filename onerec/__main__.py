"""`python -m onerec ...` is `onerec ...`."""

import sys

from onerec.cli import main

if __name__ == "__main__":
    sys.exit(main())
