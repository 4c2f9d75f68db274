"""``python -m ddprun``: the same as the ``ddprun`` command."""

from ddprun.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
