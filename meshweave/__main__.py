import sys

from meshweave.launch.cli import main

sys.exit(main())
