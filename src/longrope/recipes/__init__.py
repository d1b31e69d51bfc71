"""CLI recipes: one module per subcommand, each a thin layer of argument parsing and progress
display over the package's components. `register(subparsers)` adds the subcommand."""
