"""``python -m latentcell.launch ...`` (and ``accelerate launch -m latentcell.launch ...``)."""

from latentcell.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
