"""``python -m secagg.service.demo``: the same as ``secagg demo``."""

import sys

from secagg.service.demo import main

sys.exit(main())
