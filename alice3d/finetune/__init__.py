"""Fine-tuning: tasks (btcv, flare22, classification, custom), networks (UNETR, SwinUNETR,
nnFormer, encoder classifiers) with strict encoder.pt transfer, training/validation with
per-organ Dice and NSD, and prediction in the input image's space.

Modules: tasks, config, transforms, data, models, transfer, objectives, metrics, evaluate,
prediction_preview, predict, train, phantom_tasks. The command line is ``alice3d.cli.finetune``.
"""
