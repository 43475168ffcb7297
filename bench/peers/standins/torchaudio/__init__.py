"""Stand-in for torchaudio in LLaMA-Factory's venv: PyPI has no torchaudio build for torch 2.13, and
LLaMA-Factory's data/mm_plugin.py imports it at module level although text training never calls it.
Any use of audio fails loudly."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is not installed in this venv (a stand-in for text-only runs)")
