"""One module per ``fmh`` verb: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``."""
