"""The `lorsu-edge` command line: `main.py` wires one small file per verb."""
