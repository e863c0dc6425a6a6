import sys

from .single import main

sys.exit(main())
