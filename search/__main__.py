"""``python -m search``: run a search; the entry point that Ray jobs call."""

import sys

from search.cli import search_main

sys.exit(search_main())
