"""Where ML code already logs: a logger or callback per framework, each importing its framework only when used.

    from runwatch.integrations.lightning import RunwatchLogger        # PyTorch Lightning
    from runwatch.integrations.huggingface import RunwatchCallback    # transformers' Trainer
    from runwatch.integrations.keras import RunwatchCallback          # Keras 3
    from runwatch.integrations.xgboost import RunwatchCallback        # XGBoost
    from runwatch.integrations.lightgbm import RunwatchCallback       # LightGBM

Each logs to the run you give it, or finds one (runwatch/integrations/_common.py, docs/integrations.md).
"""
