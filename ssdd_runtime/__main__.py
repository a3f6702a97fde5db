"""`python -m ssdd_runtime` is the `ssdd` command."""
import sys

from ssdd_runtime.cli import main

if __name__ == "__main__":  # importing the module (tests walk the package) must not run the command
    sys.exit(main())
