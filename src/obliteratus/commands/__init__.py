"""The verbs of the command line, one module each (chat and compare share one): each holds the
typer-facing function (its options, their parsing, what it prints, its errors); the work is done by
the stage packages, which never import from here. ``common.py`` holds the consoles, the progress
reporter and the metrics table, ``options.py`` the options generated from the settings model;
``obliteratus.cli`` registers the verbs and runs them."""
