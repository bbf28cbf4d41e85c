"""The NNX decoder and everything that brings weights in and out of it: the HF name table,
HF safetensors and llama.cpp GGUF files, tokenizers."""
