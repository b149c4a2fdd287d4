"""brivl_ds: BriVL two-tower image-text training on DeepSpeed."""

__version__ = "0.1.0"


def load_model(model_dir, device="cpu", dtype=None):
    """A model folder written by `python -m brivl_ds.export`: towers ready for inference (brivl_ds/export.py)."""
    from brivl_ds.export import load_model as _load

    return _load(model_dir, device, dtype)
