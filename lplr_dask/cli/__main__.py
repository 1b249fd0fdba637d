import sys

from lplr_dask.cli.main import main

sys.exit(main())
