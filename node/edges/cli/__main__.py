import sys

from node.edges.cli import main

sys.exit(main())
