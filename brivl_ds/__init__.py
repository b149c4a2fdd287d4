"""brivl_ds: BriVL two-tower image-text training on DeepSpeed."""

__version__ = "0.1.0"


def load_model(model_dir, device="cpu", dtype=None):
    """A model folder written by `python -m brivl_ds.export`: towers ready for inference
    (brivl_ds/inference/exported.py)."""
    from brivl_ds.inference.exported import load_model as _load

    return _load(model_dir, device, dtype)
