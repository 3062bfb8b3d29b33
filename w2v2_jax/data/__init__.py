"""Audio data: shard preparation, the offline eSpeak corpus and the streaming tf.data input."""
