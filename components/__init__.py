"""One thin KFP component per pipeline step; each turns its inputs into one kftune.steps call."""
