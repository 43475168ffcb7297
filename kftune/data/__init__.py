"""The data stage: row formats, reading, the validation gate and token counting."""
