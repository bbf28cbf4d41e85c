import sys

from train.plan.recipe import main

sys.exit(main())
