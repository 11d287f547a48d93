"""dockyard's benchmark harness: `bin/bench` (or `python -m bench`), never run by pytest."""
