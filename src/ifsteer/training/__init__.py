"""Trained steering vectors: the paper's form (a vector added at a layer), values fitted.

- `rules`: the model's own answers rewritten to follow an instruction (torch-free);
- `data`: training examples from our own queries, rule targets and self-distillation;
- `train`: `train_vectors`, Adam on the vector with the model frozen;
- `compete`: the paper's vector against a trained one on validation; the winner ships.
"""

from ifsteer.training.compete import ANSWER_TOKENS, Contest, compete
from ifsteer.training.train import Example, TrainConfig, Trained, train_vectors

__all__ = [
    "ANSWER_TOKENS",
    "Contest",
    "Example",
    "TrainConfig",
    "Trained",
    "compete",
    "train_vectors",
]
