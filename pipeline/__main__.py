# `python -m pipeline` is the operator's command line (infra, settings, deploy; the name the
# documentation has always used); its code is in ops/cli.py. The module is named, not
# imported, so the shared core imports no operator tool.
from pipeline.entry import run_main

run_main("ops.cli")
