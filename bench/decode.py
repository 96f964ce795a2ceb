"""Decode benchmark (the same as `moestream bench decode`): see moestream/bench/decode.py.

    sudo .venv/bin/python bench/decode.py --quick --plot decode.png     # a few minutes
    sudo .venv/bin/python bench/decode.py --json > decode.json          # 10/25/50 % budgets, 4 layers
"""
import sys

from moestream.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
