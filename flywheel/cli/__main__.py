"""`python -m flywheel.cli`: the same as the `flywheel` command."""

from flywheel.cli.main import app

if __name__ == "__main__":
    app()
