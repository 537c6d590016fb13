"""PyInstaller entry script for the one-file ``emp-worker`` binary (see ../worker.spec).

It only hands over to the console script's own function, so the binary and
``pip install emp-worker`` behave the same.
"""

from worker.cli import main

if __name__ == "__main__":
    main()
