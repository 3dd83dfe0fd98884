from pipeline.entry import run_main

run_main("ops.cli")
