"""From CTC logits to text: greedy and beam-search decoding, and the n-gram language model."""
