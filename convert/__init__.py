"""The `aria-jax` command line: weight conversion and the user-facing subcommands."""
