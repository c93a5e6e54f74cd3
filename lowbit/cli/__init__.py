"""The ``lowbit`` command: one module per subcommand, sharing ``lowbit.cli.common``. What they run lives in
``lowbit.app`` (bundled models, comparisons, reports, fine-tuning runs) and in the library."""
import os
import sys

# Importing a module registers its command; this order is the order of `lowbit --help`.
from lowbit.cli import quantize  # noqa: F401, E402
from lowbit.cli import evaluate  # noqa: F401, E402
from lowbit.cli import run  # noqa: F401, E402
from lowbit.cli import compare  # noqa: F401, E402
from lowbit.cli import outliers  # noqa: F401, E402
from lowbit.cli import demo  # noqa: F401, E402
from lowbit.cli import finetune  # noqa: F401, E402
from lowbit.cli import train  # noqa: F401, E402
from lowbit.cli import export  # noqa: F401, E402
from lowbit.cli import advise  # noqa: F401, E402
from lowbit.cli import doctor  # noqa: F401, E402
from lowbit.cli import methods  # noqa: F401, E402
from lowbit.cli.common import app, passive_wait_needed


def main() -> None:
    if passive_wait_needed(sys.argv[1:], os.environ):
        # OpenMP reads its wait policy once, when torch loads (already done here): start again with it set.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "lowbit", *sys.argv[1:]])
    app()


if __name__ == "__main__":
    main()
