"""The guide's training command: `python fine_tune_qwen.py --config_file configs/train_config_lora.json`.

Same as `kftune train`; see `python fine_tune_qwen.py --help` for every key and flag.
"""

import sys

from kftune.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("kftune.train.training", sys.argv[1:]))
