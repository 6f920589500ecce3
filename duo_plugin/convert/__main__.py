import sys

from duo_plugin.convert.cli import main

sys.exit(main())
