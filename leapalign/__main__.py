"""``python -m leapalign ...`` is the ``leapalign`` command."""
from leapalign.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
