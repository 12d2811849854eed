import sys

from dfq.cli import main

sys.exit(main())
