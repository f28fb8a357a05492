"""``python -m selectws`` runs the command line."""

from selectws.ops.cli import main

if __name__ == "__main__":
    main()
