"""`python -m engine index|search`: build an index from a folder, or query a saved one."""
from .cli import main

raise SystemExit(main())
