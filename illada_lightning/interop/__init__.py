"""Interoperability with published checkpoint formats (checkpoint layer: below training, above data).

    llada_config.py   LLaDA `config.json` <-> ModelConfig (refuses architecture keys it cannot honour)
    llada_weights.py  LLaDA weight names <-> ours; lazy sharded safetensors reading, sharded writing
    hf_tokenizer.py   a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) as a Tokenizer
    llada_hf.py       the facade: detect, read, load (bf16 on GPU, memory-mapped) and export a checkpoint directory
"""


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory that cannot be read or does not fit, with the file and key named."""
