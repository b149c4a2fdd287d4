"""brivl_ds: BriVL two-tower image-text training on DeepSpeed."""

__version__ = "0.1.0"
