"""Audio data: sources, shard preparation and the streaming tf.data input."""
