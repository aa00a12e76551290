"""`python -m engine.eval`: Recall@1/5/10 and MR of global CLIP and LACLIP on a dataset split."""
from .cli import main

raise SystemExit(main())
