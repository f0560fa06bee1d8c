"""Linear-attention decoders: `linear_llama` (every layer's token mixer is causal linear attention) and `hybrid`
(every k-th layer keeps softmax attention). Config (torch-free), module, and their specs."""
