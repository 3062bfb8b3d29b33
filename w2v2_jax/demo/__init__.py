"""The offline demo: a synthetic eSpeak NG corpus in simulated rooms, and the paper in miniature."""
