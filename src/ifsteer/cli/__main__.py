"""`python -m ifsteer.cli`, as the `ifsteer` script."""

from ifsteer.cli.app import main

main()
