"""The online side of a trained BriVL: an HTTP service (app.py) over the exported towers, with concurrent requests
micro-batched (batcher.py), inputs checked before they reach the model (inputs.py), and a load benchmark (bench.py).
Started by `python -m brivl_ds.serve`."""
