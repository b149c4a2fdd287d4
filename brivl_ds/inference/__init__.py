"""A trained model after training: the exported folder and the model it loads (exported.py), embedding inputs in
batches with one decode-and-skip loop for images (encode.py), and the faiss vector index the service searches
(vector_index.py). Used by the export, embed, zeroshot, retrieval, index and serve commands."""
