"""`python -m dast` is the same as the `dast` command."""

from dast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
