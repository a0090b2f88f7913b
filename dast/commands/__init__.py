"""One module per ``dast`` sub-command: ``add_parser(subparsers, name)`` and ``run(args)``."""
