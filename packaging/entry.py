"""PyInstaller entry script for the one-file ``emp-worker`` binary (see ../worker.spec).

First the one-file start-up (worker/frozen.py: the worker dies with its bootloader), then the
console script's own function, so the binary and ``pip install emp-worker`` behave the same.
"""

from worker.frozen import enter

enter()

from worker.cli import main  # noqa: E402 -- after enter(): nothing may run before it

if __name__ == "__main__":
    main()
