"""Find similar images, SQL over the history, clusters of UNKNOWNs."""
