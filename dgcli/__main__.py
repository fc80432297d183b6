"""`python -m dgcli`: the same as the `dg` command."""

from .cli import main

if __name__ == "__main__":
    main()
