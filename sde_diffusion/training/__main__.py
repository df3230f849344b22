"""``python -m sde_diffusion.training ARGS`` is ``sde-diffusion train ARGS``: the spelling
``torchrun -m`` needs. An entry point, like ``sde_diffusion/__main__.py``: nothing in the package
imports it, so :mod:`sde_diffusion.training` itself never imports the command line, which sits
above it."""
import sys
from typing import Optional, Sequence

from ..cli import main as cli_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sde-diffusion train ARGS``: the same options (``--config``, ``--workdir``, ``--no-resume``,
    ``--eval``, ``--device``, ``--seed``, ``--quiet``, ``--config.KEY=VALUE``), the same one-line
    errors and exit statuses (:mod:`sde_diffusion.cli`: 0 done, 2 a user error, 3 NaN/Inf loss,
    128 + signal number when stopped by a signal after checkpointing)."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
