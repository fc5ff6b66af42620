"""ml_collections configs: `python -m spider_jax.train --config=configs/train.py:VARIANT`."""
