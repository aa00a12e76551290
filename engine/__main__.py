"""`python -m engine index|search|upgrade`: build or extend an index (one process or Ray), query it, upgrade it."""
from .cli import main

raise SystemExit(main())
