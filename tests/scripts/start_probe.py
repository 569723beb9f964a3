"""What a process the tests start directly sees (tests/test_start.py); PROBE_END says how it ends."""

import json
import os
import random
import sys
import time

import numpy

print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "rank": os.environ.get("RANK"), "random": [random.random(), numpy.random.random()],
                  "project_imported": any(name.split(".")[0] == "gpt_recipes" for name in sys.modules)}))
end = os.environ.get("PROBE_END", "")
if end == "exit3":
    sys.exit(3)
if end == "raise":
    raise RuntimeError("the probe was told to fail")
if end == "sleep":
    time.sleep(120)
