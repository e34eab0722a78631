"""Steering vectors: the value and its algebra, extraction, and vector files."""

from ifsteer.vectors.extract import (
    default_layer,
    default_layers,
    extract_instruction,
    extract_vectors,
    last_token_activations,
    pair_prompts,
    vectors_from_activations,
)
from ifsteer.vectors.files import (
    VectorFile,
    describe,
    load_vector,
    load_vector_directory,
    load_vector_files,
    load_vectors,
    read_vector_file,
    save_vectors,
    update_defaults,
)
from ifsteer.vectors.vector import MODES, Mode, SteeringVector

__all__ = [
    "MODES",
    "Mode",
    "SteeringVector",
    "VectorFile",
    "default_layer",
    "default_layers",
    "describe",
    "extract_instruction",
    "extract_vectors",
    "last_token_activations",
    "load_vector",
    "load_vector_directory",
    "load_vector_files",
    "load_vectors",
    "pair_prompts",
    "read_vector_file",
    "save_vectors",
    "update_defaults",
    "vectors_from_activations",
]
