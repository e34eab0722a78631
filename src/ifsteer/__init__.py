"""ifsteer: make language models follow instructions better by activation steering."""

__version__ = "0.1.0"
