"""`python -m mllama.server MODEL [options]`: the same as `mllama serve`."""
import sys

from . import main

sys.exit(main())
