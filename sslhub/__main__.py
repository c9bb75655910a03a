import sys

from sslhub.apps.cli import main

sys.exit(main())
