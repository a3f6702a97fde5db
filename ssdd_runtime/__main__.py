import sys

from ssdd_runtime.cli import main

sys.exit(main())
