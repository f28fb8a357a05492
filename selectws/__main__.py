"""``python -m selectws`` runs the command line."""

from selectws.app.cli import main

if __name__ == "__main__":
    main()
