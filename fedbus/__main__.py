"""``python -m fedbus`` is the ``fedbus`` command."""

from fedbus.cli import main

if __name__ == "__main__":
    main()
