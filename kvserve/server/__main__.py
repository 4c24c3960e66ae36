"""``python -m kvserve.server [flags]``: the same as ``kvserve serve``."""
from kvserve.server.cli import main

if __name__ == "__main__":
    main()
