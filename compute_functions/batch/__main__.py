"""``python -m compute_functions.batch``: one ``run_batch``, its request as JSON on stdin, its result on stdout."""

import sys

from compute_functions.batch import main

sys.exit(main())
