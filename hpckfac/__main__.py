"""``python -m hpckfac train ...`` is the same as the ``hpckfac`` console script."""
import sys

from hpckfac.cli import main

sys.exit(main())
