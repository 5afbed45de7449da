import sys

from moe_restore.cli import main

sys.exit(main())
