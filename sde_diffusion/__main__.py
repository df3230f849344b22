"""``python -m sde_diffusion`` runs the ``sde-diffusion`` command."""
import sys

from .cli import main

sys.exit(main())
