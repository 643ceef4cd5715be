"""`python -m mllama.server MODEL [options]`: the same as `mllama serve`."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
