"""``python -m search``: run a search; the entry point that Ray jobs call."""

import sys

from search.cli import search_main

# The guard keeps worker processes started with spawn or forkserver, which import the main module
# again, from starting a search of their own.
if __name__ == "__main__":
    sys.exit(search_main())
