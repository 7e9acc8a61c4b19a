"""The benchmark of the repair (``python bench/run.py --help``); not part of the tool."""
