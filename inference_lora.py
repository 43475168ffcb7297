"""The guide's inference command: `python inference_lora.py --base_model B --lora_model A [--chat]`.

Same as `kftune infer`; see `python inference_lora.py --help`.
"""

import sys

from kftune.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("kftune.models.infer", sys.argv[1:]))
