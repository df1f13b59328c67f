"""``python -m privfl``: the same entry point as the ``privfl`` console script."""

from privfl.cli import main

if __name__ == "__main__":
    main()
