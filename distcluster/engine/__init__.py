"""One worker's training, the same for 0, 1 or N workers: building the model and optimiser, one
step, the loop, evaluation, checkpoints and exported models. Knows nothing of Ray or MLflow.
"""
