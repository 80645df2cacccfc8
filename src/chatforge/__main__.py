import sys

from chatforge.cli.app import main

sys.exit(main())
