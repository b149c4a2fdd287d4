"""The online side of a trained BriVL: an HTTP service (app.py) over the exported towers, with concurrent requests
micro-batched (batcher.py) and inputs checked before they reach the model (inputs.py). Started by
`python -m brivl_ds.serve`; its load benchmark is brivl_ds/bench/serving.py."""
