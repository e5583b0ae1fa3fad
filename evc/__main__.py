import sys

from evc.cli import main

sys.exit(main())
