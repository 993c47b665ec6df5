"""Other libraries' models running the suite's backends (``hf``: Hugging Face transformers)."""
