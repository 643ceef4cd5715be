"""`python -m mllama`: the `mllama` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
