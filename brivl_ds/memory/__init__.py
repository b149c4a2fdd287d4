"""Memory planning: model states from shapes and the ds_config, activations traced on the meta device."""
