import sys

from hessq.cli import main

sys.exit(main())
