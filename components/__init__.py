"""One thin KFP component per pipeline step; each turns its inputs into one kftune.steps call."""

from components.evaluate import evaluate
from components.merge_adapter import merge_adapter
from components.register_model import register_model
from components.train import train
from components.validate_data import validate_data

__all__ = ["evaluate", "merge_adapter", "register_model", "train", "validate_data"]
