"""Inference backends behind one interface, and the shard -> dense embeddings batch job."""
