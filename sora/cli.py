"""The console commands pip installs with the package: `sora-sample CONFIG ...` and `sora-train CONFIG ...` are
`python -m sora.sample CONFIG ...` and `python -m sora.train CONFIG ...` (same flags, same exit codes)."""

from sora.launch import main


def sample():
    from sora.sample import run

    main(run, "sample")


def train():
    from sora.train import run

    main(run, "train")
