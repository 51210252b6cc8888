"""Run the adalora-export command line from a checkout: ``python cli.py ...`` or ``torchrun cli.py train ...``.

The program itself is ``adalora_export.cli`` (installed as the ``adalora-export`` command); this file
only starts it, so that the distribution installs no top-level module named ``cli``.
"""

from adalora_export.cli import main

if __name__ == "__main__":
    main()
