import sys

from ssl_container.cli import main

sys.exit(main())
