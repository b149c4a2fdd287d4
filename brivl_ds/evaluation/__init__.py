"""Evaluation of image-text models, in one unit: fractions in [0, 1] inside and in every file written, percent only
in printed lines. recall.py: paired and multi-caption Recall@K and the printed line; held_out.py: the trainer's
held-out evaluations, retrieval and zero-shot (online towers, sharded over ranks); captioned.py: retrieval with
several captions per image; zeroshot.py: zero-shot classification (class embeddings, readers, templates, confusion
plot)."""
