"""Training: the objective and its losses, the optimizer, run set-up, the Trainer, self-distillation data and
the metrics log.
"""
