"""The ``morphnet`` command line (``morphnet.cli.main:main``)."""
