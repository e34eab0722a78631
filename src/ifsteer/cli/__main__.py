"""`python -m ifsteer.cli`, as the `ifsteer` script.

Guarded: processes spawned by this one (vLLM's engine and workers) import the main module
again, and must not run the command a second time.
"""

from ifsteer.cli.app import main

if __name__ == "__main__":
    main()
