import sys

from gcnee.cli import main

sys.exit(main())
