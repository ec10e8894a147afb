"""``python -m hf_effllm`` runs the ``hf-effllm`` command."""

import sys

from hf_effllm.cli import main

sys.exit(main())
