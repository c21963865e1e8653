"""The console commands pip installs with the package: `sora-sample CONFIG ...`, `sora-train CONFIG ...` and
`sora-preprocess CONFIG ...` are `python -m sora.sample CONFIG ...`, `python -m sora.train CONFIG ...` and
`python -m sora.preprocess CONFIG ...` (same flags, same exit codes)."""

from sora.launch import main


def sample():
    from sora.sample import run

    main(run, "sample")


def train():
    from sora.train import run

    main(run, "train")


def preprocess():
    from sora.preprocess import cli

    cli()
